"""One command-line dialect: the same options mean the same thing in every subcommand, and the old
spellings still work with a note on stderr."""
import argparse
from pathlib import Path

import pytest

from monoflow.cli import build_parser


def _subcommand(path):
    parser = build_parser()
    for name in path.split():
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _options(path):
    return {option for action in _subcommand(path)._actions if action.help != argparse.SUPPRESS
            for option in action.option_strings}


TRAINING = {"toy2d": "--seed", "regression1d": "--seed", "table1": "--seeds", "figure4": "--seeds",
            "images train": "--seed"}


@pytest.mark.parametrize("command", sorted(TRAINING))
def test_every_training_command_speaks_the_convention(command):
    expected = {"-o", "--output", "--set", "--threads", "--device", "--no-progress", TRAINING[command]}
    assert expected <= _options(command)


@pytest.mark.parametrize("command", ["evaluate", "sample", "book"])
def test_the_other_commands_use_the_same_names(command):
    options = _options(command)
    assert "--device" in options
    assert command == "book" or {"--threads", "--seed"} <= options
    assert command != "book" or {"-o", "--output", "--set", "--no-progress"} <= options
    assert command != "sample" or ("--out" in options and "--output" not in options)


@pytest.mark.parametrize("old,new", [
    (["book", "-p", "rerun=true", "--parameter", "L=0.5"], ["book", "--set", "rerun=true", "--set", "L=0.5"]),
    (["book", "--results-dir", "elsewhere"], ["book", "--results", "elsewhere"]),
    (["sample", "run", "-o", "prefix"], ["sample", "run", "--out", "prefix"]),
    (["sample", "run", "--output", "prefix"], ["sample", "run", "--out", "prefix"]),
])
def test_an_old_spelling_still_works_and_says_what_replaces_it(old, new, capsys):
    parsed_old = vars(build_parser().parse_args(old))
    note = capsys.readouterr().err
    parsed_new = vars(build_parser().parse_args(new))
    assert capsys.readouterr().err == ""
    assert parsed_old == parsed_new
    replacement = next(word for word in new[1:] if word.startswith("--"))
    assert "is deprecated; use " + replacement in note and "error" not in note


def test_book_device_is_the_device_parameter(monkeypatch):
    import monoflow.book
    import monoflow.cli.book as book_cli

    seen = {}
    monkeypatch.setattr(monoflow.book, "build_book", lambda *args, **kwargs: seen.update(kwargs) or Path("html"))
    monkeypatch.setattr(book_cli, "_check_declared", lambda overrides, notebooks: None)
    args = build_parser().parse_args(["book", "--device", "cuda", "--set", "rerun=true"])
    assert args.handler(args) == 0
    assert seen["parameters"] == {"rerun": True, "device": "cuda"}

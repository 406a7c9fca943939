"""The experiment commands of the ``monoflow`` CLI: help, argument errors, tiny runs end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monoflow.cli import main

TINY = ["--set", "nblocks=2", "--set", "depth=1", "--set", "growth=8", "--set", "batch_size=32",
        "--set", "iterations=4", "--set", "test_every=2", "--set", "test_samples=64", "--set", "report_last=2",
        "--set", "figure_grid=12", "--set", "figure_samples=64", "--set", "roundtrip_points=16", "--threads", "1",
        "--no-progress"]
TINY_1D = ["--set", "depth=1", "--set", "growth=8", "--set", "batch_size=32", "--set", "iterations=4",
           "--set", "test_every=2", "--set", "test_samples=64", "--set", "figure_points=20",
           "--set", "lr_milestones=2,3", "--threads", "1", "--no-progress"]
COMMANDS = ["toy2d", "regression1d", "table1", "figure4", "evaluate", "sample"]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: monoflow " + command in out
    if command in ("toy2d", "regression1d", "table1", "figure4"):
        for option in ("--preset", "--set", "--device", "--output"):
            assert option in out


@pytest.mark.parametrize("argv, message", [
    (["toy2d", "--dataset", "moon"], "invalid choice: 'moon'"),
    (["toy2d"], "required: --dataset"),
    (["toy2d", "--dataset", "moons", "--preset", "huge"], "invalid choice: 'huge'"),
    (["regression1d", "--model", "monotone"], "invalid choice: 'monotone'"),
    (["table1", "--seeds", "zero"], "invalid int value"),
    (["figure4", "--models", "residual", "bogus"], "invalid choice: 'bogus'"),
])
def test_argparse_errors_exit_nonzero(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["toy2d", "--dataset", "moons", "--set", "itrations=3"], "valid fields: preset, seed, iterations"),
    (["toy2d", "--dataset", "moons", "--set", "iterations=many"], "cannot read iterations='many' as int"),
    (["toy2d", "--dataset", "moons", "--set", "iterations"], "expects key=value"),
    (["regression1d", "--set", "lr=-1"], "lr must be positive"),
    (["toy2d", "--dataset", "moons", "--threads", "0"], "--threads must be >= 1"),
    (["evaluate", "no/such/run"], "no checkpoint at"),
])
def test_value_errors_return_one(argv, message, capsys, tmp_path):
    assert main(argv + (["--output", str(tmp_path)] if argv[0] != "evaluate" else [])) == 1
    assert message in capsys.readouterr().err


def test_tiny_runs_through_the_cli(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["toy2d", "--dataset", "rings", "--model", "monotone", "--seed", "2", "--output", out, *TINY]) == 0
    run_dir = tmp_path / "toy2d" / "quick" / "monotone" / "rings" / "seed2"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["seed"] == 2 and record["config"]["iterations"] == 4 and record["status"] == "finished"
    assert "nll_nats = " in capsys.readouterr().out

    # a finished run is skipped; an interrupted one resumes
    assert main(["toy2d", "--dataset", "rings", "--model", "monotone", "--seed", "2", "--output", out, *TINY]) == 0
    assert main(["toy2d", "--dataset", "rings", "--model", "idensenet", "--output", out, "--stop-after", "2", *TINY]) == 0
    assert "stopped at iteration 2" in capsys.readouterr().out
    assert main(["toy2d", "--dataset", "rings", "--model", "idensenet", "--output", out, *TINY]) == 0
    assert "nll_nats = " in capsys.readouterr().out

    assert main(["evaluate", str(run_dir), "--samples", "50", "--seed", "1"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["metric_name"] == "nll_nats" and np.isfinite(evaluated["metric"]) and evaluated["samples"] == 50

    prefix = tmp_path / "draws" / "s"
    assert main(["sample", str(run_dir / "checkpoint.pt"), "--n", "40", "--output", str(prefix)]) == 0
    samples = np.load(prefix.with_suffix(".npy"))
    assert samples.shape == (40, 2) and np.isfinite(samples).all()
    assert prefix.with_suffix(".png").stat().st_size > 0

    assert main(["regression1d", "--model", "residual", "--output", out, *TINY_1D]) == 0
    assert "mse = " in capsys.readouterr().out
    assert main(["sample", str(tmp_path / "regression1d" / "quick" / "residual" / "seed0")]) == 1
    assert "toy2d checkpoint" in capsys.readouterr().err


def test_table1_and_figure4_commands(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["table1", "--datasets", "moons", "--models", "monotone", "--seeds", "0", "1", "--output", out, *TINY]) == 0
    printed = capsys.readouterr().out
    assert "[2/2]" in printed and "moons" in printed
    table = (tmp_path / "tables" / "table1_toy2d_quick.csv").read_text().splitlines()
    assert table[0].startswith("dataset,model,preset,seeds,nll_nats_mean") and table[1].startswith("moons,monotone,quick,2,")
    assert (tmp_path / "toy2d" / "quick" / "figure5.png").is_file()
    assert main(["figure4", "--models", "residual_actnorm", "--output", out, *TINY_1D]) == 0
    assert (tmp_path / "tables" / "figure4_regression1d_quick.csv").is_file()
    assert (tmp_path / "regression1d" / "quick" / "figure4.png").is_file()

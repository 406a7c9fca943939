"""Options shared by the subcommands, and the one way an old spelling keeps working.

The convention of every subcommand: ``-o/--output ROOT`` is the results root a command writes
to, ``--set KEY=VALUE`` overrides one configuration field (repeatable), ``--threads N``,
``--device DEVICE``, ``--no-progress``, ``--seed K`` (one run) or ``--seeds K ...`` (several); a
file a command writes is ``--out PATH``.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["Deprecated"]


class Deprecated(argparse.Action):
    """An old spelling that still works: one note on stderr, then the effect of ``replacement``.

    ``append=True`` adds the value to the list of the same ``dest`` (for repeatable options).
    Hidden from ``--help``.
    """

    def __init__(self, option_strings, dest, replacement: str, append: bool = False, **kwargs):
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.replacement, self.append = replacement, append

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated; use {self.replacement}", file=sys.stderr)
        if self.append:
            values = list(getattr(namespace, self.dest) or []) + [values]
        setattr(namespace, self.dest, values)

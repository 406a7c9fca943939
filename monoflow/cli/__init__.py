"""The ``monoflow`` command line.

Every module in this package that defines ``register(subparsers)`` contributes subcommands;
``main`` discovers them, so each area (toy experiments, images, the book) owns its own file.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Optional, Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monoflow",
        description="Monotone Flows: train, evaluate and sample the paper's models, regenerate its "
        "tables and build the companion book.",
    )
    from monoflow import __version__

    parser.add_argument("--version", action="version", version=f"monoflow {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``monoflow`` console command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        result = args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"monoflow {args.command}: error: {error}", file=sys.stderr)
        return 1
    return int(result or 0)

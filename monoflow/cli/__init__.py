"""The ``monoflow`` command line.

Every module in this package that defines ``register(subparsers)`` contributes subcommands;
``main`` discovers them, so each area (toy experiments, images, the book) owns its own file.

Whatever a user can cause (a bad option, a damaged file, a full disk, a device this machine does
not have) ends in one line on stderr and exit status 1, never a traceback; ``--debug`` (anywhere
on the command line) or ``MONOFLOW_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import pkgutil
import sys
from typing import Optional, Sequence

__all__ = ["build_parser", "main", "check_device", "check_counts"]

#: Setting this environment variable (to anything but "" or "0") shows tracebacks, as ``--debug`` does.
DEBUG_VARIABLE = "MONOFLOW_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monoflow",
        description="Monotone Flows: train, evaluate and sample the paper's models, regenerate its "
        "tables and build the companion book.",
    )
    from monoflow import __version__

    parser.add_argument("--version", action="version", version=f"monoflow {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (also: {DEBUG_VARIABLE}=1); may be given anywhere")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def check_device(device: Optional[str]) -> None:
    """Refuse a ``--device`` this machine cannot use, before any work starts."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {device!r} is not a torch device; use cpu or cuda (cuda:0, ...)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: monoflow runs on cpu or cuda")


#: Integer options of any subcommand and the least value that makes sense (``None``: not given).
_LEAST_VALUES = {"iterations": 1, "epochs": 1, "batch_size": 1, "accumulation_steps": 1, "stop_after": 0,
                 "threads": 1, "n": 1, "samples": 1, "draws": 1, "eval_every": 0, "eval_limit": 0,
                 "concat_start": 0, "seed": 0, "eval_seed": 0, "sample_seed": 0}
#: Real-valued options that must be positive and finite.
_POSITIVE_NUMBERS = ("lr", "temperature")


def check_counts(args: argparse.Namespace) -> None:
    """Refuse counts no run can use (``--iterations 0``, ``--batch-size 0``, ``--stop-after -1``, ...)
    instead of letting a falsy value fall back to a default unnoticed."""
    for key, least in _LEAST_VALUES.items():
        value = getattr(args, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < least:
            option = "--" + key.replace("_", "-")
            raise ValueError(f"{option} must be >= {least}, got {value}")
    for key in _POSITIVE_NUMBERS:
        value = getattr(args, key, None)
        if isinstance(value, float) and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{key} must be a positive number, got {value}")


def _describe(error: BaseException) -> str:
    """One line saying what went wrong, for the error message of :func:`main`."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    text = " ".join(str(error).split()) if str(error).strip() else ""
    if isinstance(error, (ValueError, FileNotFoundError, RuntimeError, KeyError, TypeError)) and text:
        return text.strip("'\"") if isinstance(error, KeyError) else text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``monoflow`` console command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug may follow the subcommand's options, which the top-level parser would reject
    debug = "--debug" in argv or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        check_counts(args)
        check_device(getattr(args, "device", None))
        result = args.handler(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"monoflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every error a user can cause ends in one line
        if debug:
            raise
        print(f"monoflow {args.command}: error: {_describe(error)}", file=sys.stderr)
        if not isinstance(error, (ValueError, OSError, RuntimeError)):
            print(f"(unexpected; rerun with --debug or {DEBUG_VARIABLE}=1 for the traceback)", file=sys.stderr)
        return 1
    return int(result or 0)

"""``monoflow book``: execute the notebooks with papermill and build the companion book."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List

from monoflow.cli.options import Deprecated

__all__ = ["register"]


def _parse_parameter(text: str) -> List[Any]:
    """``NAME=VALUE`` with VALUE read as YAML (numbers, true/false, lists), else a string."""
    import yaml

    name, separator, value = text.partition("=")
    if not separator or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. device=cuda), got {text!r}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return [name.strip(), parsed]


def _check_declared(overrides: Dict[str, Any], notebooks: List[str]) -> None:
    """Refuse a ``--set NAME=...`` that none of the notebooks to run declares (papermill would drop it)."""
    import difflib

    from monoflow.notebooks.parameters import declared_names

    declared = {name: declared_names(name) for name in notebooks}
    known = sorted({parameter for names in declared.values() for parameter in names})
    for name in overrides:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--set {name}: no notebook to run ({', '.join(notebooks)}) declares a parameter {name!r}"
                             f"{hint}; declared: {', '.join(known)}")


def _run(args: argparse.Namespace) -> int:
    from monoflow.book import NOTEBOOKS, build_book

    overrides: Dict[str, Any] = dict(args.parameter or [])
    if args.device is not None:
        overrides["device"] = args.device
    _check_declared(overrides, args.notebook or [spec.name for spec in NOTEBOOKS])
    html = build_book(
        args.output,
        quick=args.quick,
        execute=not args.no_execute,
        notebooks=args.notebook,
        results_dir=args.results_dir,
        parameters=overrides,
        kernel_name=args.kernel,
        progress=not args.no_progress,
    )
    print(f"open {html / 'index.html'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``monoflow book`` to the command line."""
    from monoflow.book import NOTEBOOKS

    names = [spec.name for spec in NOTEBOOKS]
    parser = subparsers.add_parser(
        "book",
        help="execute the notebooks with papermill and build the companion book (HTML)",
        description="Execute every notebook in notebooks/ with papermill into the book, then build "
        "the HTML with jupyter-book (warnings are errors, no network needed). By default the "
        "notebooks read the committed results/; --quick re-runs each experiment at its smallest "
        "size instead. The HTML lands in OUTPUT/html.",
    )
    parser.add_argument("--quick", "--smoke", action="store_true",
                        help="run each notebook at its smallest parameters (a few minutes on CPU)")
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="build folder (default: book/_build); HTML in OUTPUT/html")
    parser.add_argument("--no-execute", action="store_true",
                        help="do not run notebooks; rebuild the HTML from the executed copies")
    parser.add_argument("--notebook", action="append", choices=names, default=None,
                        help="execute only this notebook (repeatable); the others must have been "
                        "executed before into the same build folder")
    parser.add_argument("--results", dest="results_dir", type=Path, default=None, metavar="ROOT",
                        help="results root the notebooks read (default: the committed results/)")
    parser.add_argument("--results-dir", dest="results_dir", type=Path, action=Deprecated,
                        replacement="--results ROOT")
    parser.add_argument("--set", dest="parameter", action="append", type=_parse_parameter,
                        metavar="NAME=VALUE",
                        help="papermill parameter for every notebook that declares it, e.g. "
                        "--set rerun=true --set iterations=500 (repeatable)")
    parser.add_argument("--parameter", "-p", dest="parameter", type=_parse_parameter, action=Deprecated,
                        append=True, replacement="--set NAME=VALUE")
    parser.add_argument("--device", default=None,
                        help="torch device of the notebooks that train or time models, e.g. cuda "
                        "(the same as --set device=DEVICE)")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: python3)")
    parser.add_argument("--no-progress", action="store_true", help="hide per-cell progress bars")
    parser.set_defaults(handler=_run)

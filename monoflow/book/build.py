"""Building the companion book: stage ``book/``, execute the chapters' notebooks with papermill,
build the HTML with ``jupyter-book`` and check that it works offline (the build folder's layout
is in :mod:`monoflow.book`)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence

from monoflow.book.chapters import NOTEBOOKS, NotebookSpec
from monoflow.book.execute import _declared_parameters, _notebook_path, execute_notebook, notebook_parameters
from monoflow.book.offline import external_resources
from monoflow.book.status import reproduction_status
from monoflow.notebooks.paths import repository_root

__all__ = ["build_book"]


_BUILD_ONLY = {"_build", "chapters", "_generated"}


def _stage_sources(book_dir: Path, source_dir: Path) -> None:
    """Copy book/ into the build's source folder, keeping earlier executed chapters."""
    source_dir.mkdir(parents=True, exist_ok=True)
    wanted = {item.name for item in book_dir.iterdir()}
    for stale in source_dir.iterdir():
        if stale.name not in wanted and stale.name not in _BUILD_ONLY:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    for item in book_dir.iterdir():
        if item.name in _BUILD_ONLY or item.name.startswith("."):
            continue
        destination = source_dir / item.name
        if item.is_dir():
            if destination.exists():
                shutil.rmtree(destination)
            shutil.copytree(item, destination)
        else:
            shutil.copy2(item, destination)


def _run_jupyter_book(source_dir: Path, site_dir: Path, log: Callable[[str], None]) -> Path:
    executable = shutil.which("jupyter-book")
    command = [executable] if executable else [sys.executable, "-m", "jupyter_book"]
    command += ["build", str(source_dir), "--path-output", str(site_dir), "--all",
                "--warningiserror", "--keep-going"]
    log(f"building HTML: {' '.join(command)}")
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        text = (completed.stdout + completed.stderr).strip().splitlines()
        warnings = [line for line in text if "WARNING" in line or "ERROR" in line]
        shown = "\n".join((warnings or text)[-30:])
        raise RuntimeError(f"jupyter-book build failed (warnings are errors):\n{shown}")
    return site_dir / "_build" / "html"


def build_book(
    output_dir: Optional[Path] = None,
    *,
    quick: bool = False,
    execute: bool = True,
    notebooks: Optional[Sequence[str]] = None,
    results_dir: Optional[Path] = None,
    parameters: Optional[Mapping[str, Any]] = None,
    kernel_name: Optional[str] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Execute every notebook with papermill into the book, build the HTML, return its folder.

    Args:
        output_dir: build folder (default ``book/_build`` of the checkout); see
            :mod:`monoflow.book` for its layout. The HTML lands in ``output_dir/html``.
        quick: run each notebook at its smallest parameters (:attr:`NotebookSpec.quick`):
            experiments re-run for a few iterations into ``output_dir/reruns``.
        execute: when False, build from the executed copies already in the build folder.
        notebooks: names (e.g. ``"01_theory"``) to execute; the others must already be
            executed in the build folder. Default: all.
        results_dir: results folder the notebooks read (default: the committed ``results/``).
        parameters: overrides passed to every notebook that declares the parameter.
        kernel_name: Jupyter kernel (default: the notebook's, ``python3``).
        progress: show papermill's per-cell progress bar.
        log: where progress lines go.

    Raises:
        NotebookError: a notebook failed (the message names it and its error).
        RuntimeError: ``jupyter-book build`` reported a warning or error, or a page loads a
            resource over the network.
    """
    root = repository_root()
    output_dir = Path(output_dir) if output_dir is not None else root / "book" / "_build"
    output_dir = output_dir.resolve()
    given_results = Path(results_dir).resolve() if results_dir is not None else None
    selected = _selected_notebooks(notebooks)

    source_dir = output_dir / "source"
    chapters = source_dir / "chapters"
    _stage_book(root / "book", source_dir, given_results or root / "results", quick=quick, execute=execute)
    to_run = [spec for spec in NOTEBOOKS if execute and spec.name in selected]
    _require_executed_copies(to_run, chapters)

    started = time.perf_counter()
    _execute_chapters(to_run, root / "notebooks", chapters, output_dir / "reruns", quick=quick,
                      results_dir=given_results, overrides=parameters, kernel_name=kernel_name,
                      progress=progress, log=log)
    html_dir = _build_html(source_dir, output_dir, log)
    log(f"book built in {time.perf_counter() - started:.1f} s: {html_dir / 'index.html'}")
    return html_dir


def _selected_notebooks(notebooks: Optional[Sequence[str]]) -> List[str]:
    """The names of the notebooks to execute (default: all chapters).

    Raises:
        ValueError: a name that is no chapter's.
    """
    known = [spec.name for spec in NOTEBOOKS]
    selected = list(notebooks) if notebooks is not None else known
    unknown = sorted(set(selected) - set(known))
    if unknown:
        raise ValueError(f"unknown notebook(s) {unknown}; expected names from {known}")
    return selected


def _stage_book(book_dir: Path, source_dir: Path, results_dir: Path, *, quick: bool, execute: bool) -> None:
    """Copy ``book_dir`` into ``source_dir``, make its ``chapters/`` folder and write the
    reproduction status of ``results_dir`` (kept from the executed chapters when not ``execute``)."""
    _stage_sources(book_dir, source_dir)
    (source_dir / "chapters").mkdir(parents=True, exist_ok=True)
    status = source_dir / "_generated" / "status.md"
    if execute or not status.is_file():  # --no-execute keeps the status of the executed chapters
        status.parent.mkdir(exist_ok=True)
        status.write_text(reproduction_status(results_dir, quick=quick), encoding="utf-8")


def _require_executed_copies(to_run: Sequence[NotebookSpec], chapters: Path) -> None:
    """Refuse a build in which a chapter neither runs now nor has an executed copy in ``chapters``."""
    missing = [spec.name for spec in NOTEBOOKS
               if spec not in to_run and not (chapters / f"{spec.name}.ipynb").is_file()]
    if missing:
        raise FileNotFoundError(
            f"no executed copy of {missing} in {chapters}; run without --no-execute (or include "
            "them in the notebooks to execute) first"
        )


def _execute_chapters(
    to_run: Sequence[NotebookSpec],
    notebooks_dir: Path,
    chapters: Path,
    reruns: Path,
    *,
    quick: bool,
    results_dir: Optional[Path],
    overrides: Optional[Mapping[str, Any]],
    kernel_name: Optional[str],
    progress: bool,
    log: Callable[[str], None],
) -> None:
    """Execute each notebook of ``to_run`` into ``chapters`` with its parameters
    (:func:`notebook_parameters`; a rerun writes into ``reruns/<notebook>``), logging each."""
    for index, spec in enumerate(to_run, start=1):
        source = _notebook_path(spec.name, notebooks_dir)
        rerun_dir = reruns / spec.name
        values = notebook_parameters(
            spec, quick=quick, rerun_dir=rerun_dir, results_dir=results_dir,
            overrides=overrides, declared=_declared_parameters(source),
        )
        shown = ", ".join(f"{key}={value!r}" for key, value in values.items())
        log(f"[{index}/{len(to_run)}] running notebooks/{spec.name}.ipynb ({shown})")
        tic = time.perf_counter()
        execute_notebook(source, chapters / f"{spec.name}.ipynb", values, cwd=notebooks_dir,
                         kernel_name=kernel_name, progress=progress)
        log(f"[{index}/{len(to_run)}] {spec.name} done in {time.perf_counter() - tic:.1f} s")


def _build_html(source_dir: Path, output_dir: Path, log: Callable[[str], None]) -> Path:
    """Build the HTML of ``source_dir`` into ``output_dir/html`` and return that folder.

    Raises:
        RuntimeError: ``jupyter-book build`` failed, or a built page loads a resource over the network.
    """
    built = _run_jupyter_book(source_dir, output_dir / "site", log)
    html_dir = output_dir / "html"
    if html_dir.exists():
        shutil.rmtree(html_dir)
    shutil.move(str(built), str(html_dir))
    problems = external_resources(html_dir)
    if problems:
        listing = "; ".join(f"{page}: {', '.join(found)}" for page, found in problems.items())
        raise RuntimeError(f"the built book loads resources over the network: {listing}")
    return html_dir

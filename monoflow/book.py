r"""Assemble the companion book: run the notebooks with papermill, then build the HTML.

The sources are ``notebooks/*.ipynb`` (outputs cleared, each with a papermill ``parameters``
cell) and ``book/`` (Jupyter Book configuration, table of contents, Markdown chapters,
bibliography and the vendored MathJax). :func:`build_book` lays out one build folder::

    <output>/source/            a copy of book/ plus chapters/ (the executed notebooks)
    <output>/source/chapters/   papermill-executed copies of notebooks/*.ipynb
    <output>/reruns/<notebook>/ experiment outputs of notebooks run with ``rerun=True``
    <output>/html/              the built book (open index.html)

The default ``<output>`` is ``book/_build`` (git-ignored): executed notebooks are build output
and are never committed. The HTML is built with ``jupyter-book build --warningiserror``, and a
built page that loads a script or stylesheet over http(s) fails the build, so the book renders
(MathJax included) without network access.

Example (the book in its smallest configuration, a few minutes of CPU)::

    >>> from monoflow.book import build_book
    >>> html = build_book(quick=True)                     # doctest: +SKIP
"""
from __future__ import annotations

import datetime as _datetime
import html.parser
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from monoflow.provenance import device_description, git_commit, machine_of

__all__ = [
    "NotebookSpec",
    "NotebookError",
    "NOTEBOOKS",
    "repository_root",
    "default_results_dir",
    "notebook_parameters",
    "execute_notebook",
    "build_book",
    "external_resources",
    "provenance",
    "results_provenance",
    "session_kinds",
    "session_machines",
    "reproduction_status",
    "html_table",
]


@dataclass(frozen=True)
class NotebookSpec:
    """One chapter of the book backed by a notebook in ``notebooks/``.

    ``quick`` holds the parameters of the smallest run that still exercises the real code
    (used by ``monoflow book --quick`` and the tests); the book's default parameters are the
    notebook's own (read the committed results).
    """

    name: str
    title: str
    quick: Mapping[str, Any] = field(default_factory=dict)


# The smallest runs that still train every model for a few steps: each notebook well under a
# minute on two CPU cores (the book test runs them all).
_QUICK_REGRESSION = {"test_every": 2, "test_samples": 200, "batch_size": 64, "growth": 16, "depth": 2,
                     "figure_points": 200}
_QUICK_TOY = {"test_every": 2, "test_samples": 200, "batch_size": 64, "nblocks": 2, "figure_grid": 30,
              "figure_samples": 300, "roundtrip_points": 16}

NOTEBOOKS: Tuple[NotebookSpec, ...] = (
    NotebookSpec(
        "01_theory",
        "Theory: monotone operators as flows",
        quick={"n_pairs": 400, "n_maps": 60, "grid_size": 121},
    ),
    NotebookSpec(
        "02_expressivity_1d",
        "1-D expressivity (Figure 4)",
        quick={"rerun": True, "preset": "quick", "iterations": 4, "overrides": _QUICK_REGRESSION},
    ),
    NotebookSpec(
        "03_toy_densities_2d",
        "2-D toy densities (Table 1)",
        quick={"rerun": True, "preset": "quick", "iterations": 4, "datasets": ["8gaussians"],
               "models": ["idensenet", "monotone"], "overrides": _QUICK_TOY},
    ),
    NotebookSpec(
        "04_images",
        "Image benchmarks (Table 2)",
        quick={},
    ),
    NotebookSpec(
        "05_speed",
        "How long it takes",
        quick={},
    ),
)


class NotebookError(RuntimeError):
    """A notebook failed while papermill executed it; the message names the notebook and cell."""


def repository_root() -> Path:
    """The checkout that holds ``notebooks/`` and ``book/`` (the parent of the package folder).

    Raises:
        FileNotFoundError: monoflow is installed without its repository (e.g. from a wheel).
    """
    root = Path(__file__).resolve().parent.parent
    if not (root / "notebooks").is_dir() or not (root / "book" / "_config.yml").is_file():
        raise FileNotFoundError(
            f"expected notebooks/ and book/_config.yml next to the package in {root}; the book is "
            "built from a checkout of the monoflow repository (pip install -e '.[book]')"
        )
    return root


def default_results_dir() -> Path:
    """The committed ``results/`` folder of the checkout, else ``./results``."""
    try:
        return repository_root() / "results"
    except FileNotFoundError:
        return Path.cwd() / "results"


def _notebook_path(name: str, notebooks_dir: Path) -> Path:
    path = notebooks_dir / f"{name}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"notebook {path} not found (expected one per chapter: "
                                f"{', '.join(spec.name for spec in NOTEBOOKS)})")
    return path


def _declared_parameters(path: Path) -> Dict[str, Any]:
    """Names and default values of the notebook's papermill ``parameters`` cell."""
    import papermill

    declared = papermill.inspect_notebook(str(path))
    if not declared:
        raise ValueError(f"{path} has no cell tagged 'parameters' (papermill needs one)")
    return declared


def notebook_parameters(
    spec: NotebookSpec,
    *,
    quick: bool = False,
    rerun_dir: Optional[Path] = None,
    results_dir: Optional[Path] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    declared: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The parameters papermill injects into one notebook.

    Order of precedence: ``overrides`` > the ``quick`` set (when ``quick``) > ``results_dir``
    and ``output_dir`` (``rerun_dir``: where a notebook run with ``rerun=True`` writes; passed
    only when the notebook reruns).
    When ``declared`` (the notebook's own parameter names) is given, only those names are
    passed, so a global override such as ``device="cuda"`` reaches just the notebooks that
    take it.
    """
    parameters: Dict[str, Any] = {}
    if results_dir is not None:
        parameters["results_dir"] = str(results_dir)
    if rerun_dir is not None:
        parameters["output_dir"] = str(rerun_dir)
    if quick:
        parameters.update(spec.quick)
    parameters.update(overrides or {})
    if not parameters.get("rerun") and "output_dir" not in (overrides or {}):
        parameters.pop("output_dir", None)
    if declared is not None:
        parameters = {key: value for key, value in parameters.items() if key in declared}
    return parameters


def execute_notebook(
    source: Path,
    target: Path,
    parameters: Mapping[str, Any],
    *,
    cwd: Optional[Path] = None,
    kernel_name: Optional[str] = None,
    progress: bool = True,
    threads: Optional[int] = 1,
) -> Path:
    """Execute ``source`` with papermill into ``target`` (the executed copy, outputs kept).

    The kernel runs with ``threads`` intra-op threads (``OMP_NUM_THREADS``; ``None`` leaves the
    environment alone): the chapters' computations use small tensors, for which one thread is
    fastest, and OpenMP threads competing for a busy core slow them down by orders of magnitude.

    Raises:
        NotebookError: a cell raised; the message names the notebook, the cell and the error,
            and points at ``target``, which holds the full traceback.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    target.parent.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("OMP_NUM_THREADS")
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        papermill.execute_notebook(
            str(source),
            str(target),
            parameters=dict(parameters),
            kernel_name=kernel_name,
            progress_bar=progress,
            cwd=str(cwd) if cwd is not None else None,
        )
    except PapermillExecutionError as error:
        raise NotebookError(
            f"notebook {source.name} failed in cell {error.exec_count} with "
            f"{error.ename}: {error.evalue}\n(executed copy with the full traceback: {target})"
        ) from error
    finally:
        if threads is not None:
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = previous
    return target


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


class _ResourceParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: List[str] = []

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        values = dict(attrs)
        url = None
        if tag in {"script", "img", "iframe"}:
            url = values.get("src")
        elif tag == "link" and (values.get("rel") or "") in {"stylesheet", "preload", "modulepreload"}:
            url = values.get("href")
        if url and url.strip().lower().startswith(("http://", "https://", "//")):
            self.found.append(f"<{tag}> {url}")


def external_resources(html_dir: Path) -> Dict[str, List[str]]:
    """Scripts, stylesheets, images and frames that built pages load over the network.

    Returns a mapping page -> list of offending tags; empty when the book works offline.
    Links (``<a href>``) are not resources and are allowed.
    """
    html_dir = Path(html_dir)
    if not html_dir.is_dir():
        raise FileNotFoundError(f"built HTML folder {html_dir} not found")
    problems: Dict[str, List[str]] = {}
    for page in sorted(html_dir.rglob("*.html")):
        parser = _ResourceParser()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        if parser.found:
            problems[str(page.relative_to(html_dir))] = parser.found
    return problems


def reproduction_status(results_dir: Path, quick: bool = False) -> str:
    """A Markdown summary of the finished runs in ``results_dir`` for the book's introduction.

    One table row per experiment and preset: finished runs, iterations, devices. Experiments
    without runs are listed as not yet reproduced. ``quick`` adds a line saying the book was
    built in its smallest configuration (numbers from a few training steps, not results).
    """
    from monoflow.experiments.results import find_runs
    from monoflow.images.results import read_runs

    results_dir = Path(results_dir)
    rows: List[str] = []
    labels = {"regression1d": "1-D expressivity (Figure 4)", "toy2d": "2-D toy densities (Table 1)"}
    for experiment, label in labels.items():
        runs = find_runs(results_dir, experiment)
        if not runs:
            rows.append(f"| {label} | - | 0 | - | - | not yet reproduced |")
        for preset in sorted({run["preset"] for run in runs}):
            part = [run for run in runs if run["preset"] == preset]
            iterations = sorted({int(run["timing"]["iterations"]) for run in part})
            devices = sorted({str(run["provenance"]["device"]) for run in part})
            rows.append(f"| {label} | `{preset}` | {len(part)} | {', '.join(f'{i:,}' for i in iterations)} | "
                        f"{', '.join(devices)} | finished runs |")
    image_runs = read_runs(results_dir / "images") if (results_dir / "images").is_dir() else []
    if not image_runs:
        rows.append("| Image benchmarks (Table 2) | - | 0 | - | - | not yet reproduced |")
    for preset in sorted({run["preset"] for run in image_runs}):
        part = [run for run in image_runs if run["preset"] == preset]
        iterations = sorted({int(run.get("iterations") or 0) for run in part})
        devices = sorted({str(run.get("provenance", {}).get("gpu") or run.get("provenance", {}).get("device"))
                          for run in part})
        scale = sorted({str(run.get("scale") or "") for run in part})
        rows.append(f"| Image benchmarks (Table 2) | `{preset}` | {len(part)} | "
                    f"{', '.join(f'{i:,}' for i in iterations)} | {', '.join(devices)} | {', '.join(scale)} |")
    lines = ["| experiment | preset | runs | iterations | device | status / scale |",
             "| --- | --- | --- | --- | --- | --- |", *rows, ""]
    if quick:
        lines.insert(0, "```{note}\nThis copy of the book was built in its smallest configuration "
                        "(`monoflow book --quick`): the 1-D and 2-D chapters retrain their models for a "
                        "few steps only, so their numbers test the pipeline and are not results.\n```\n")
    try:
        shown = results_dir.resolve().relative_to(repository_root())
    except (ValueError, FileNotFoundError):
        shown = results_dir
    lines.insert(0 if not quick else 1, f"Results folder: `{shown}`.\n")
    return "\n".join(lines)


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
        output_dir: build folder (default ``book/_build`` of the checkout); see the module
            docstring for its layout. The HTML lands in ``output_dir/html``.
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
    results_dir = given_results or root / "results"
    known = [spec.name for spec in NOTEBOOKS]
    selected = list(notebooks) if notebooks is not None else known
    unknown = sorted(set(selected) - set(known))
    if unknown:
        raise ValueError(f"unknown notebook(s) {unknown}; expected names from {known}")

    source_dir = output_dir / "source"
    chapters = source_dir / "chapters"
    _stage_sources(root / "book", source_dir)
    chapters.mkdir(parents=True, exist_ok=True)
    status = source_dir / "_generated" / "status.md"
    if execute or not status.is_file():  # --no-execute keeps the status of the executed chapters
        status.parent.mkdir(exist_ok=True)
        status.write_text(reproduction_status(results_dir, quick=quick), encoding="utf-8")

    to_run = [spec for spec in NOTEBOOKS if execute and spec.name in selected]
    missing = [spec.name for spec in NOTEBOOKS
               if spec not in to_run and not (chapters / f"{spec.name}.ipynb").is_file()]
    if missing:
        raise FileNotFoundError(
            f"no executed copy of {missing} in {chapters}; run without --no-execute (or include "
            "them in the notebooks to execute) first"
        )

    started = time.perf_counter()
    for index, spec in enumerate(to_run, start=1):
        source = _notebook_path(spec.name, root / "notebooks")
        rerun_dir = output_dir / "reruns" / spec.name
        values = notebook_parameters(
            spec, quick=quick, rerun_dir=rerun_dir, results_dir=given_results,
            overrides=parameters, declared=_declared_parameters(source),
        )
        shown = ", ".join(f"{key}={value!r}" for key, value in values.items())
        log(f"[{index}/{len(to_run)}] running notebooks/{spec.name}.ipynb ({shown})")
        tic = time.perf_counter()
        execute_notebook(source, chapters / f"{spec.name}.ipynb", values, cwd=root / "notebooks",
                         kernel_name=kernel_name, progress=progress)
        log(f"[{index}/{len(to_run)}] {spec.name} done in {time.perf_counter() - tic:.1f} s")

    built = _run_jupyter_book(source_dir, output_dir / "site", log)
    html_dir = output_dir / "html"
    if html_dir.exists():
        shutil.rmtree(html_dir)
    shutil.move(str(built), str(html_dir))
    problems = external_resources(html_dir)
    if problems:
        listing = "; ".join(f"{page}: {', '.join(found)}" for page, found in problems.items())
        raise RuntimeError(f"the built book loads resources over the network: {listing}")
    log(f"book built in {time.perf_counter() - started:.1f} s: {html_dir / 'index.html'}")
    return html_dir


def html_table(
    frame: "Any",
    formats: Optional[Mapping[Any, Any]] = None,
    na_rep: str = "n/a",
    index: bool = False,
) -> "Any":
    """A pandas ``Styler`` of ``frame`` that the book renders as one of its tables.

    ``formats`` maps columns to format strings or callables (``Styler.format``); missing
    values show ``na_rep``; the index is hidden unless ``index``. The table carries the
    ``dataframe`` class, so the book's theme styles it like a plain DataFrame.
    """
    styler = frame.style.format(dict(formats or {}), na_rep=na_rep)
    if not index:
        styler = styler.hide(axis="index")
    return styler.set_table_attributes('class="dataframe"')


def results_provenance(records: Sequence[Mapping[str, Any]], root: Optional[Path] = None) -> "Any":
    """Where every number of a chapter comes from: one row per run record (``run.json``).

    Accepts the records of :func:`monoflow.experiments.results.find_runs` (folder in
    ``run_dir``) and of :func:`monoflow.images.results.read_runs` (folder in ``_dir``).
    Columns: run (folder, relative to ``root``), git commit, device, created (UTC),
    iterations, wall time in minutes (of the whole process), and how many runs that process
    trained together (``monoflow.ensemble``; 1 for a run alone); when some run trained with the
    compiled loss (``--compile``), also "training loss": ``compiled``, ``eager`` or both, from its
    sessions (runs that predate the record were eager); when some run recorded how it solved (the
    1-D flows' ``scalar`` solves), also "solves" (runs that predate the record used ``anderson``).
    """
    import pandas as pd

    rows = []
    for record in records:
        folder = Path(str(record.get("run_dir") or record.get("_dir") or "?"))
        if root is not None:
            try:
                folder = folder.resolve().relative_to(Path(root).resolve())
            except ValueError:
                pass
        origin = record.get("provenance", {})
        timing = record.get("timing", {})
        wall = timing.get("wall_time_s", record.get("wall_time_s"))
        rows.append({
            "run": str(folder),
            "git commit": str(origin.get("git_commit") or "unknown")[:12],
            "device": origin.get("gpu") or origin.get("device"),
            "created (UTC)": str(origin.get("created") or origin.get("time_utc") or "")[:16].replace("T", " "),
            "iterations": timing.get("iterations", record.get("iterations")),
            "wall time (min)": None if wall is None else round(float(wall) / 60, 1),
            "runs trained together": int(record.get("ensemble", {}).get("size", 1)),
            "training loss": session_kinds(record, "training_loss", "eager"),
            "solves": session_kinds(record, "solves", "anderson"),
        })
    columns = ["run", "git commit", "device", "created (UTC)", "iterations", "wall time (min)", "runs trained together"]
    columns += [column for column, default in (("training loss", "eager"), ("solves", "anderson"))
                if any(row[column] != default for row in rows)]
    return pd.DataFrame(rows, columns=columns)


def _over_sessions(record: Mapping[str, Any], describe: Callable[[Mapping[str, Any]], str], default: str) -> str:
    """The distinct ``describe(session)`` of a run's sessions, sorted and joined by `` + ``
    (``default`` for a record without sessions)."""
    values = {describe(session) for session in record.get("sessions") or []}
    return " + ".join(sorted(values)) if values else default


def session_kinds(record: Mapping[str, Any], key: str, default: str) -> str:
    """The first words of a session note over a run's sessions (``default`` where a session has
    none), e.g. ``eager``, ``compiled`` or ``compiled + eager``."""
    return _over_sessions(record, lambda session: str(session.get(key, default)).split(" ")[0], default)


def session_machines(record: Mapping[str, Any]) -> str:
    """The machines a run trained on, thread counts aside (:func:`monoflow.provenance.machine_of`),
    e.g. ``cpu (AMD EPYC) + cpu (AMD EPYC, AVX2)``; a record without sessions gives its provenance's."""
    default = machine_of(record.get("provenance", {}).get("device", "unknown"))
    return _over_sessions(record, lambda session: machine_of(session.get("device", "unknown")), default)


def provenance(parameters: Mapping[str, Any], device: Optional[str] = None) -> "Any":
    """A two-column table (pandas DataFrame) that ends every notebook.

    Rows: monoflow version, git commit of the checkout, Python, PyTorch, the device the
    notebook computed on (``device``, else the CUDA device if one is visible, else CPU),
    the host platform, the time, and every parameter the notebook ran with.
    """
    import pandas as pd
    import torch

    import monoflow

    if device is None or str(device).startswith("cuda"):
        if torch.cuda.is_available():
            index = torch.device(device or "cuda").index or 0
            device = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
        elif device is None:
            device = "cpu"
    if str(device) == "cpu":
        device = device_description("cpu")
    commit = git_commit()
    rows = [
        ("monoflow version", monoflow.__version__),
        ("git commit", commit),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("device", str(device)),
        ("platform", platform.platform()),
        ("executed at (UTC)", _datetime.datetime.now(_datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")),
    ]
    rows += [(f"parameter {key}", repr(value)) for key, value in parameters.items()]
    return pd.DataFrame(rows, columns=["item", "value"]).set_index("item")

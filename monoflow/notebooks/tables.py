"""The tables on the notebooks' pages: any DataFrame styled as a book table, where each
chapter's numbers come from (run records, their sessions and machines), and the provenance
table that ends every notebook."""
from __future__ import annotations

import datetime as _datetime
import platform
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from monoflow.provenance import device_description, git_commit, machine_of

__all__ = ["html_table", "results_provenance", "session_kinds", "session_machines", "provenance"]


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

"""Running one notebook with papermill: the parameters it gets (quick set, overrides, folders;
only those it declares) and its execution, failing loudly with :class:`NotebookError`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from monoflow.book.chapters import NOTEBOOKS, NotebookSpec

__all__ = ["NotebookError", "notebook_parameters", "execute_notebook"]


class NotebookError(RuntimeError):
    """A notebook failed while papermill executed it; the message names the notebook and cell."""


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

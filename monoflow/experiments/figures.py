"""Figures of the small experiments, drawn from the arrays saved beside each run.

Each finished 2-D run keeps ``figure.npz`` (data samples, density grid, model samples) and each
1-D run ``fit.npz`` (grid, target, fitted function), so figures are redrawn without a model:

* :func:`plot_toy_run`: data histogram | model density on [-4, 4]^2 | histogram of model samples
  (one row of the paper's Figure 5);
* :func:`plot_toy_grid`: the data and one density per model for several data sets;
* :func:`plot_regression_fits`: the fitted functions of the 1-D models against the staircase
  (the paper's Figure 4).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "plot_toy_run",
    "plot_toy_grid",
    "plot_regression_fits",
    "save_toy_figure",
    "save_samples_figure",
    "save_regression_figure",
    "load_toy_arrays",
    "load_regression_arrays",
]

PathLike = Union[str, os.PathLike]
_EXTENT = 4.0


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def _new_figure(figsize: Tuple[float, float]) -> Any:
    """A figure outside pyplot's state (no GUI, no global registry): for files written in training."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def _run_dir(run: Union[PathLike, Dict[str, Any]]) -> Path:
    if isinstance(run, dict):
        if "run_dir" not in run:
            raise ValueError("run record has no 'run_dir'; load it with monoflow.experiments.results.load_run")
        return Path(run["run_dir"])
    path = Path(run)
    return path.parent if path.name == "run.json" else path


def _load_arrays(run: Union[PathLike, Dict[str, Any]], file_name: str, experiment: str) -> Dict[str, np.ndarray]:
    path = _run_dir(run) / file_name
    if not path.is_file():
        raise FileNotFoundError(f"no {file_name} at {path} (is the {experiment} run finished?)")
    with np.load(path) as arrays:
        return {key: arrays[key] for key in arrays.files}


def load_toy_arrays(run: Union[PathLike, Dict[str, Any]]) -> Dict[str, np.ndarray]:
    """The arrays behind a 2-D run's figure: ``data``, ``axis``, ``density``, ``samples``."""
    return _load_arrays(run, "figure.npz", "2-D")


def load_regression_arrays(run: Union[PathLike, Dict[str, Any]]) -> Dict[str, np.ndarray]:
    """The arrays behind a 1-D run's figure: ``x``, ``target``, ``prediction``."""
    return _load_arrays(run, "fit.npz", "1-D")


def _histogram(ax: Any, points: np.ndarray, bins: int = 100) -> None:
    points = points[np.isfinite(points).all(axis=1)]
    ax.hist2d(points[:, 0], points[:, 1], bins=bins, range=[[-_EXTENT, _EXTENT], [-_EXTENT, _EXTENT]], cmap="inferno")


def _density(ax: Any, arrays: Dict[str, np.ndarray]) -> None:
    axis = arrays["axis"]
    ax.imshow(
        arrays["density"],
        origin="lower",
        extent=(axis[0], axis[-1], axis[0], axis[-1]),
        cmap="inferno",
        interpolation="nearest",
    )


def _clean(ax: Any, title: str) -> None:
    ax.set_xlim(-_EXTENT, _EXTENT)
    ax.set_ylim(-_EXTENT, _EXTENT)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)


def _draw_toy(arrays: Dict[str, np.ndarray], axes: Sequence[Any]) -> None:
    _histogram(axes[0], arrays["data"])
    _clean(axes[0], "data")
    _density(axes[1], arrays)
    _clean(axes[1], "model density")
    _histogram(axes[2], arrays["samples"])
    _clean(axes[2], "model samples")


def save_toy_figure(arrays: Dict[str, np.ndarray], path: PathLike, title: str = "") -> None:
    """Draw data | density | samples from ``arrays`` and save it as ``path`` (PNG)."""
    figure = _new_figure((9, 3.2))
    axes = figure.subplots(1, 3)
    _draw_toy(arrays, axes)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_toy_run(run_dir_or_dict: Union[PathLike, Dict[str, Any]], ax: Any = None) -> Any:
    """Plot one finished 2-D run: data histogram, model density, histogram of model samples.

    ``ax`` may be ``None`` (a new figure with three panels), a sequence of three Axes, or a single
    Axes (only the model density is drawn). Returns the Figure.
    """
    arrays = load_toy_arrays(run_dir_or_dict)
    if ax is None:
        plt = _pyplot()
        figure, axes = plt.subplots(1, 3, figsize=(9, 3.2))
        _draw_toy(arrays, axes)
        figure.tight_layout()
        return figure
    if hasattr(ax, "imshow"):
        _density(ax, arrays)
        _clean(ax, "model density")
        return ax.figure
    axes = list(np.ravel(ax))
    if len(axes) != 3:
        raise ValueError(f"plot_toy_run needs one Axes or three, got {len(axes)}")
    _draw_toy(arrays, axes)
    return axes[0].figure


def plot_toy_grid(
    results_dir: PathLike = "results",
    preset: str = "quick",
    models: Sequence[str] = ("idensenet", "monotone"),
    datasets: Optional[Sequence[str]] = None,
    seed: int = 0,
) -> Any:
    """The paper's Figure 5: one row per data set, columns data, then one density per model.

    ``datasets=None`` takes all eight. Runs that are missing are drawn as an empty panel saying so.
    """
    from monoflow.data.toy import TOY_DATASETS

    datasets = list(TOY_DATASETS if datasets is None else datasets)
    models = list(models)
    if not datasets or not models:
        raise ValueError("plot_toy_grid needs at least one data set and one model")
    plt = _pyplot()
    figure, axes = plt.subplots(len(datasets), len(models) + 1, figsize=(2.2 * (len(models) + 1), 2.2 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        data_drawn = False
        for column, model in enumerate(models, start=1):
            ax = axes[row, column]
            run_dir = Path(results_dir) / "toy2d" / preset / model / dataset / f"seed{seed}"
            try:
                arrays = load_toy_arrays(run_dir)
            except FileNotFoundError:
                ax.text(0.5, 0.5, "no finished run", ha="center", va="center", transform=ax.transAxes)
                _clean(ax, model)
                continue
            _density(ax, arrays)
            _clean(ax, model)
            if not data_drawn:
                _histogram(axes[row, 0], arrays["data"])
                data_drawn = True
        _clean(axes[row, 0], "data")
        axes[row, 0].set_ylabel(dataset)
    figure.tight_layout()
    return figure


def _draw_fit(ax: Any, arrays: Dict[str, np.ndarray], title: str) -> None:
    ax.plot(arrays["x"], arrays["target"], color="black", lw=1.5, label="target")
    ax.plot(arrays["x"], arrays["prediction"], color="tab:red", lw=1.2, ls="--", label="flow")
    ax.set_xlim(-2, 2)
    ax.set_title(title, fontsize=9)


def save_regression_figure(arrays: Dict[str, np.ndarray], path: PathLike, title: str = "") -> None:
    """Draw the fitted 1-D function against the staircase and save it as ``path`` (PNG)."""
    figure = _new_figure((4, 3.2))
    ax = figure.subplots()
    _draw_fit(ax, arrays, title)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_regression_fits(
    results_dir: PathLike = "results",
    preset: str = "quick",
    models: Optional[Sequence[str]] = None,
    seed: int = 0,
) -> Any:
    """The paper's Figure 4: one panel per 1-D model, fit against the target, test MSE in the title."""
    from monoflow.experiments.config import REGRESSION_MODELS
    from monoflow.experiments.results import load_run

    models = list(REGRESSION_MODELS if models is None else models)
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.0), squeeze=False)
    for ax, model in zip(axes[0], models):
        run_dir = Path(results_dir) / "regression1d" / preset / model / f"seed{seed}"
        try:
            arrays = load_regression_arrays(run_dir)
            record = load_run(run_dir)
        except FileNotFoundError:
            ax.text(0.5, 0.5, "no finished run", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(model, fontsize=9)
            continue
        _draw_fit(ax, arrays, f"{model}\nMSE {record['final_metric']:.2e}")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    return figure


def save_samples_figure(samples: np.ndarray, path: PathLike, title: str = "") -> None:
    """Histogram of 2-D samples on [-4, 4]^2, saved as ``path`` (PNG)."""
    figure = _new_figure((4, 4))
    ax = figure.subplots()
    _histogram(ax, samples)
    _clean(ax, title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)

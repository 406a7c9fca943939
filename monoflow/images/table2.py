r"""Table 2 and its ablation from image runs: which runs make a scale, training them, the tables.

A *scale* is a set of (preset, models) pairs (:data:`TABLE2_SCALES`): ``paper`` (the paper's
presets, one GPU or many), ``cpu`` (real offline data at the size of a 2-core CPU:
``digits-cpu`` and ``mnist5k-cpu``, three models and the ablation's two mixed rows) and
``quick`` (the tiny ``digits`` demo). :func:`train_scale` trains every (preset, model, seed)
of a scale in turn: finished runs are skipped, unfinished ones resume from their checkpoint,
and a run another process is training is left to it, so several workers may share one list.

:func:`table2` collects every image ``run.json`` of a scale below a results folder (any device,
including runs a user made) into one row per (data set, model): the mean and standard deviation
of the test bpd over seeds, the estimator's own spread (the mean over runs of the std over
evaluation draws), parameters, steps, seconds per optimiser step (the median over logged
windows after warm-up; it counts every micro-batch of gradient accumulation), solver evaluations
per block and step, and the device, with the paper's number beside each row it corresponds to.
:func:`ablation_table` orders the four ablation rows (#1 CLipSwish + residual ... #4 CPila +
monotone) of the scale's ablation data set.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from monoflow.images.results import read_runs, run_directory, seconds_per_step

__all__ = ["TABLE2_SCALES", "ABLATION_ROWS", "Table2Scale", "planned_runs", "train_scale", "training_plan",
           "hours_spent", "table2", "ablation_table", "write_table2", "paper_image_numbers", "seconds_per_step",
           "learning_curves", "late_improvement", "compare_models", "curve_gaps", "extended_runs", "late_improvement_curve",
           "plateau_forecast",
           "scale_of_preset"]

PathLike = Union[str, os.PathLike]

#: ablation row -> (model name, what it is)
ABLATION_ROWS: Dict[int, Tuple[str, str]] = {
    1: ("idensenet", "#1 CLipSwish + residual (i-DenseNet)"),
    2: ("residual-cpila", "#2 CPila + residual"),
    3: ("monotone-clipswish", "#3 CLipSwish + monotone"),
    4: ("monotone", "#4 CPila + monotone (Monotone Flow)"),
}


@dataclass(frozen=True)
class Table2Scale:
    """The presets of a scale with the models each trains, and the data set of its ablation."""

    name: str
    runs: Tuple[Tuple[str, Tuple[str, ...]], ...]
    ablation_dataset: Optional[str]
    description: str

    @property
    def presets(self) -> Tuple[str, ...]:
        return tuple(p for p, _ in self.runs)


_ABLATION_MODELS = tuple(model for model, _ in ABLATION_ROWS.values())
_CPU_MODELS = ("monotone", "idensenet", "resflow")

TABLE2_SCALES: Dict[str, Table2Scale] = {
    "cpu": Table2Scale(
        "cpu",
        (("digits-cpu", _CPU_MODELS),
         ("mnist5k-cpu", _CPU_MODELS + tuple(m for m in _ABLATION_MODELS if m not in _CPU_MODELS))),
        "mnist5k", "reduced scale on a 2-core CPU: real offline data (8x8 digits, 5,000 real MNIST images)",
    ),
    "paper": Table2Scale(
        "paper",
        (("mnist", ("monotone",)), ("cifar10", ("monotone",)), ("imagenet32", ("monotone",)),
         ("imagenet64", ("monotone",)), ("cifar10-vardeq", ("monotone",)), ("imagenet32-vardeq", ("monotone",)),
         *((f"cifar10-ablation-{row}", (model,)) for row, (model, _) in ABLATION_ROWS.items())),
        "cifar10", "the paper's presets (GPUs)",
    ),
    "quick": Table2Scale("quick", (("digits", ("monotone", "idensenet")),), None,
                         "the tiny digits demo (minutes)"),
}

#: our data set -> the paper's column (mnist5k is a 5,000-image subset of MNIST: shown for reference)
_PAPER_DATASET = {"mnist": "mnist", "mnist5k": "mnist", "cifar10": "cifar10", "imagenet32": "imagenet32",
                  "imagenet64": "imagenet64"}
_PAPER_MODEL = {"monotone": "Monotone Flow", "idensenet": "i-DenseNet", "resflow": "Residual Flow",
                "monotone+vdq": "Monotone Flow + VDQ"}


def get_scale(name: str) -> Table2Scale:
    if name not in TABLE2_SCALES:
        raise ValueError(f"unknown Table 2 scale {name!r}; expected one of {sorted(TABLE2_SCALES)}")
    return TABLE2_SCALES[name]


def paper_image_numbers():
    """The paper's Table 2 (bpd and parameter counts), one row per model (a pandas DataFrame)."""
    import pandas as pd

    with resources.files("monoflow.paper_data").joinpath("table2_images_bpd.csv").open("r", encoding="utf-8") as f:
        return pd.read_csv(f)


def _paper_entry(dataset: str, model: str) -> Tuple[Optional[float], Optional[str]]:
    column = _PAPER_DATASET.get(dataset)
    name = _PAPER_MODEL.get(model)
    if column is None or name is None:
        return None, None
    table = paper_image_numbers().set_index("model")
    if name not in table.index:
        return None, None
    bpd, params = table.loc[name, f"{column}_bpd"], table.loc[name, f"{column}_params"]
    return (None if bpd != bpd else float(bpd)), (None if params != params else str(params))


def planned_runs(scale: str, seeds: Sequence[int], presets: Optional[Sequence[str]] = None,
                 models: Optional[Sequence[str]] = None) -> List[Tuple[str, str, int]]:
    """(preset, model, seed) of every run of ``scale``, seed-major (all seed-0 runs first)."""
    spec = get_scale(scale)
    for name, valid in (("preset", spec.presets), ("model", sorted({m for _, ms in spec.runs for m in ms}))):
        chosen = presets if name == "preset" else models
        unknown = sorted(set(chosen or ()) - set(valid))
        if unknown:
            raise ValueError(f"scale {scale!r} has no {name} {', '.join(unknown)}; expected some of {', '.join(valid)}")
    return [(preset, model, seed) for seed in seeds for preset, ms in spec.runs for model in ms
            if (not presets or preset in presets) and (not models or model in models)]


def _finished(run_dir: Path, preset: str) -> bool:
    """A run.json with at least the preset's steps (a preset made longer resumes its runs)."""
    from monoflow.images.checkpoint import read_record
    from monoflow.models.image import get_image_preset

    if not (run_dir / "run.json").exists():
        return False
    planned = get_image_preset(preset).training.iterations
    return planned is None or read_record(run_dir / "run.json").get("iterations", 0) >= planned


def train_scale(scale: str, seeds: Sequence[int], *, results_dir: PathLike = "results/images",
                presets: Optional[Sequence[str]] = None, models: Optional[Sequence[str]] = None,
                data_root: Optional[str] = None, device: Optional[str] = None, progress: bool = True,
                training_overrides: Optional[dict] = None, model_overrides: Optional[dict] = None,
                log=print) -> Dict[str, List[str]]:
    """Train every run of ``scale`` that is not finished; returns the runs by outcome.

    A run whose folder another process has locked is skipped (``busy``), so two workers started
    with the same command share the list; rerunning the command resumes and skips what finished.
    """
    from monoflow.checkpoint import FolderBusyError
    from monoflow.images.training import train_image_flow

    outcome: Dict[str, List[str]] = {"finished_before": [], "trained": [], "busy": [], "stopped": []}
    for preset, model, seed in planned_runs(scale, seeds, presets, models):
        run_dir = run_directory(results_dir, preset, model, seed)
        label = f"{preset}/{model}/seed{seed}"
        if _finished(run_dir, preset):
            outcome["finished_before"].append(label)
            continue
        log(f"training {label}")
        try:
            result = train_image_flow(preset, model=model, seed=seed, results_dir=str(results_dir),
                                      data_root=data_root, device=device, progress=progress,
                                      training_overrides=training_overrides, model_overrides=model_overrides)
        except FolderBusyError as busy:
            log(f"skipping {label}: {busy}")
            outcome["busy"].append(label)
            continue
        if result.get("preempted"):
            outcome["stopped"].append(label)
            break
        outcome["trained"].append(label)
    return outcome


def training_plan(scale: str, seeds: Sequence[int], results_dir: PathLike = "results/images",
                  presets: Optional[Sequence[str]] = None, models: Optional[Sequence[str]] = None):
    """What ``train_scale`` has left: one row per planned run (a pandas DataFrame) with its state
    (``finished``, ``in use`` by another process, ``partial``: a checkpoint to resume, ``damaged
    checkpoint``, with the reason under ``problem``, or ``not started``), the steps done and
    planned, and the hours left at the pace of the finished runs of the same preset and model
    (their median training seconds per step, which include the curve's evaluations, times the
    steps left, plus their median final evaluation; empty where no run of that pair has finished).
    Hours are those of one process at the finished runs' thread count and device, the ones their
    ``device`` column names."""
    import pandas as pd

    from monoflow.checkpoint import CheckpointError, folder_holder
    from monoflow.images.checkpoint import load_checkpoint
    from monoflow.models.image import get_image_preset

    finished: Dict[Tuple[str, str], List[dict]] = {}
    for run in read_runs(results_dir):
        if _finished(Path(run["_dir"]), run.get("preset", "")) and run.get("iterations") and run.get("wall_time_s"):
            finished.setdefault((run["preset"], run["model"]), []).append(run)
    rows = []
    for preset, model, seed in planned_runs(scale, seeds, presets, models):
        run_dir = run_directory(results_dir, preset, model, seed)
        done_runs = finished.get((preset, model), [])
        steps = (get_image_preset(preset).training.iterations
                 or (int(done_runs[0]["iterations"]) if done_runs else None))
        holder, problem = folder_holder(run_dir), None
        if _finished(run_dir, preset):
            state, done = "finished", steps
        else:
            try:
                checkpoint = load_checkpoint(run_dir)
            except CheckpointError as error:  # mid-write by its holder, or a file to delete
                checkpoint, problem = None, str(error)
            done = int(checkpoint["step"]) if checkpoint else 0
            state = ("in use" if holder else "partial" if checkpoint else
                     "damaged checkpoint" if problem else "not started")
        hours = None
        if state != "finished" and done_runs and steps is not None:
            pace = float(np.median([r["wall_time_s"] / r["iterations"] for r in done_runs]))
            evaluation = float(np.median([r.get("evaluation_seconds") or 0.0 for r in done_runs]))
            hours = (pace * max(steps - done, 0) + evaluation) / 3600
        rows.append({"preset": preset, "model": model, "seed": seed, "state": state, "steps_done": done,
                     "steps": steps, "hours_left": hours, "pace_from_runs": len(done_runs),
                     "in_use_by": holder, "problem": problem})
    return pd.DataFrame(rows)


def hours_spent(results_dir: PathLike = "results/images", scale: str = "cpu") -> float:
    """Hours of one process that the finished runs of ``scale`` took: training (with the curve's
    evaluations) plus the final evaluation, summed over runs."""
    runs = _scale_runs(results_dir, scale)
    return sum(r.get("wall_time_s", 0.0) + (r.get("evaluation_seconds") or 0.0) for r in runs) / 3600


def _model_label(run: dict) -> str:
    variational = run.get("model_config", {}).get("dequantization") == "variational"
    return run["model"] + ("+vdq" if variational else "")


def _mean_of(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _solver_mean(run: dict, key: str) -> Optional[float]:
    return _mean_of([e.get(f"solver_{key}") for e in run.get("train_log", [])])


def table2(results_dir: PathLike = "results/images", scale: str = "cpu"):
    """One row per (data set, model, steps) of ``scale``: bpd over seeds next to the paper's number."""
    import pandas as pd

    spec = get_scale(scale)
    groups: Dict[Tuple[str, str, int], List[dict]] = {}  # runs of other lengths are other rows
    for run in read_runs(results_dir):
        if run.get("preset") in spec.presets and "bpd_test" in run.get("metrics", {}):
            groups.setdefault((run["dataset"], _model_label(run), int(run["iterations"])), []).append(run)
    rows = []
    for (dataset, model, _), runs in sorted(groups.items()):
        runs = sorted(runs, key=lambda r: r["seed"])
        bpds = [r["metrics"]["bpd_test"] for r in runs]
        paper_bpd, paper_params = _paper_entry(dataset, model)
        devices = sorted({r.get("provenance", {}).get("device", "?") for r in runs})
        rows.append({
            "dataset": dataset, "model": model, "scale": runs[0].get("scale"),
            "seeds": " ".join(str(r["seed"]) for r in runs), "n_seeds": len(runs),
            "bpd_mean": float(np.mean(bpds)), "bpd_std_over_seeds": float(np.std(bpds, ddof=1)) if len(bpds) > 1 else None,
            "estimator_std": _mean_of([r["metrics"].get("bpd_std") for r in runs]),
            "params": runs[0].get("params"), "steps": int(runs[0]["iterations"]),
            "seconds_per_step": _mean_of([seconds_per_step(r) for r in runs]),
            "wall_time_s": _mean_of([r.get("wall_time_s") for r in runs]),
            "forward_evaluations_per_block": _mean_of([_solver_mean(r, "forward_evaluations") for r in runs]),
            "adjoint_evaluations_per_block": _mean_of([_solver_mean(r, "adjoint_evaluations") for r in runs]),
            "lipschitz_bound_max": _mean_of([r["metrics"].get("lipschitz_bound_max") for r in runs]),
            "device": "; ".join(devices), "paper_bpd": paper_bpd, "paper_params": paper_params,
        })
    return pd.DataFrame(rows)


def ablation_table(results_dir: PathLike = "results/images", scale: str = "cpu"):
    """The four ablation rows of ``scale``'s ablation data set, in the paper's order."""
    import pandas as pd

    spec = get_scale(scale)
    table = table2(results_dir, scale)
    rows = []
    for row, (model, text) in ABLATION_ROWS.items():
        match = table[(table["dataset"] == spec.ablation_dataset) & (table["model"] == model)] if len(table) else table
        match = match.sort_values(["steps", "n_seeds"], ascending=False) if len(match) else match  # the longest runs
        entry = match.iloc[0].to_dict() if len(match) else {"dataset": spec.ablation_dataset, "model": model}
        entry.update({"row": row, "ablation": text})
        rows.append(entry)
    columns = ["row", "ablation", "dataset", "model", "n_seeds", "bpd_mean", "bpd_std_over_seeds",
               "estimator_std", "params", "steps", "seconds_per_step", "device"]
    return pd.DataFrame(rows).reindex(columns=columns)


def write_table2(results_dir: PathLike = "results/images", scale: str = "cpu",
                 tables_dir: PathLike = "results/tables") -> List[Path]:
    """Write ``table2_images_<scale>.csv`` and ``table2_ablation_<scale>.csv``; returns their paths."""
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    paths = [tables_dir / f"table2_images_{scale}.csv"]
    table2(results_dir, scale).to_csv(paths[0], index=False)
    if get_scale(scale).ablation_dataset:
        paths.append(tables_dir / f"table2_ablation_{scale}.csv")
        ablation_table(results_dir, scale).to_csv(paths[1], index=False)
    return paths


def scale_of_preset(preset: str) -> Optional[str]:
    """The first scale whose runs include ``preset`` (None if none does)."""
    return next((name for name, spec in TABLE2_SCALES.items() if preset in spec.presets), None)


def _scale_runs(results_dir: PathLike, scale: str) -> List[dict]:
    presets = get_scale(scale).presets
    return [r for r in read_runs(results_dir) if r.get("preset") in presets and "bpd_test" in r.get("metrics", {})]


def _curve_points(run: dict) -> List[Tuple[int, float, str]]:
    """(step, test bpd, test images) of a run's evaluations during training."""
    total = run.get("metrics", {}).get("n_test_images")
    return [(int(e["step"]), float(e["bpd_test"]), _point_images(e, total))
            for e in run.get("evaluations", []) if "bpd_test" in e]


def _last_images_points(run: dict) -> List[Tuple[int, float, str]]:
    """:func:`_curve_points` on the last point's test images (a run continued past a change of
    them has two sets)."""
    points = _curve_points(run)
    return [p for p in points if p[2] == points[-1][2]] if points else points


def _curve(run: dict) -> List[Tuple[int, float, str]]:
    """:func:`_curve_points`, then the final evaluation (labelled with the last point's images,
    so that it stays with its curve)."""
    points = _curve_points(run)
    return points + [(int(run["iterations"]), float(run["metrics"]["bpd_test"]), points[-1][2] if points else "all")]


def learning_curves(results_dir: PathLike = "results/images", scale: str = "cpu"):
    """Test bpd against optimiser steps of every finished run of ``scale`` (one row per point).

    Points during training are one estimator draw on ``eval_curve_images`` test images; the
    last point of each run is the final evaluation (all test images, ``n_eval_draws`` draws).
    """
    import pandas as pd

    rows = [{"dataset": r["dataset"], "model": _model_label(r), "seed": r["seed"], "step": step, "bpd": bpd,
             "final": i == len(curve) - 1, "test_images": images}
            for r in _scale_runs(results_dir, scale) for curve in [_curve(r)]
            for i, (step, bpd, images) in enumerate(curve)]
    return pd.DataFrame(rows, columns=["dataset", "model", "seed", "step", "bpd", "final", "test_images"])


def curve_gaps(curves, better: str, worse: str) -> List[Dict[str, object]]:
    """How the gap between two models moved along training, from :func:`learning_curves`: per data
    set and set of test images, the mean over seeds of each model's points during training, and
    their gap ``worse - better`` (positive: ``better`` is lower) at the point nearest 80% of the
    last step both curves have, at that last step, and ``held_since``: the first step from which
    the gap kept the sign it ends with."""
    out = []
    during = curves[~curves["final"]] if len(curves) else curves
    for (dataset, images), part in during.groupby(["dataset", "test_images"]) if len(during) else []:
        part = part[part["model"].isin([better, worse])]
        table = part.pivot_table(index="step", columns="model", values="bpd", aggfunc="mean").dropna()
        if set(table.columns) != {better, worse} or len(table) < 2:
            continue
        gap = table[worse] - table[better]
        steps = [int(step) for step in gap.index]
        last = steps[-1]
        late = min(steps[:-1], key=lambda step: abs(step - 0.8 * last))
        ends_positive = bool(gap.iloc[-1] > 0)
        held_since = last
        for step, value in zip(reversed(steps), reversed(gap.tolist())):
            if (value > 0) != ends_positive:
                break
            held_since = step
        seeds = part.groupby("model")["seed"].nunique()
        out.append({"dataset": dataset, "test_images": images, "better": better, "worse": worse,
                    "seeds": (int(seeds[better]), int(seeds[worse])), "late_step": late, "gap_late": float(gap[late]),
                    "last_step": last, "gap_last": float(gap[last]), "held_since": held_since})
    return out


def _point_images(point: dict, total: Optional[int]) -> str:
    """Which test images a curve point used: ``"all"``, ``"spread, seed 0"``
    (:func:`~monoflow.data.images.spread_subset`) or, for points before the spread subset,
    ``"first N"``: the first N of the split, which on a split ordered by class is a few classes."""
    if "curve_subset" in point:
        return point["curve_subset"]
    used = point.get("n_test_images")
    return "all" if used is None or total is None or used >= total else f"first {used}"


def late_improvement(run: dict) -> Optional[float]:
    """Relative improvement of the test bpd over the last fifth of training, measured on the
    learning curve's own points (the same test images and one draw each): (bpd at the point nearest
    80% of the steps - bpd at the last point) / the former. Below 0.01 counts as a plateau. The
    final evaluation (all test images, several draws) is not mixed in; when a run has no curve
    point at its last step, the last point during training stands for it. Only points on the last
    point's test images count (a run continued past a change of them has two sets)."""
    points = _last_images_points(run)
    if len(points) < 2:
        return None
    target = 0.8 * run["iterations"]
    step, bpd, _ = min(points[:-1], key=lambda p: abs(p[0] - target))
    return (bpd - points[-1][1]) / bpd


def extended_runs(extended_dir: PathLike, base_dir: PathLike = "results/images", scale: str = "cpu"):
    """Runs trained on past their scale's length, next to the run they continue: one row per
    finished run of ``scale`` under ``extended_dir`` whose (preset, model, seed) has a shorter
    finished run under ``base_dir``. Columns: the test bpd of the final evaluations at both lengths
    (``bpd_base`` after ``steps_base``, ``bpd`` after ``steps``), ``change`` = bpd / bpd_base - 1,
    and the last-fifth improvement (:func:`late_improvement`) of each. A run continued from the
    base run's checkpoint with more ``--iterations`` trains as one run of that length would: the
    learning rate is constant after warm-up, each step's batch and noise follow (seed, step), and
    the checkpoint restores the random state (a test checks that the weights are identical)."""
    import pandas as pd

    base = {(r["preset"], r["model"], r["seed"]): r for r in _scale_runs(base_dir, scale)}
    rows = []
    for run in _scale_runs(extended_dir, scale):
        short = base.get((run["preset"], run["model"], run["seed"]))
        if short is None or short["iterations"] >= run["iterations"]:
            continue
        bpd, bpd_base = float(run["metrics"]["bpd_test"]), float(short["metrics"]["bpd_test"])
        rows.append({"dataset": run["dataset"], "model": _model_label(run), "seed": run["seed"],
                     "steps_base": int(short["iterations"]), "bpd_base": bpd_base,
                     "late_improvement_base": late_improvement(short), "steps": int(run["iterations"]), "bpd": bpd,
                     "late_improvement": late_improvement(run), "change": bpd / bpd_base - 1})
    columns = ["dataset", "model", "seed", "steps_base", "bpd_base", "late_improvement_base", "steps", "bpd",
               "late_improvement", "change"]
    return pd.DataFrame(rows, columns=columns).sort_values(["dataset", "model", "seed"]).reset_index(drop=True)


def late_improvement_curve(run: dict, since: float = 0.5) -> List[Tuple[int, float]]:
    r"""The last-fifth improvement as the run went on: for every curve point :math:`L` from ``since``
    of the run's steps to its end, :math:`(b(0.8L) - b(L))/b(0.8L)`, the improvement a run of
    :math:`L` steps would have shown (:func:`late_improvement` at its last point), with
    :math:`b(0.8L)` interpolated linearly between the points around it. Points on the last point's
    test images only; a length whose :math:`0.8L` comes before the first of them is left out."""
    points = _last_images_points(run)
    if not points:
        return []
    steps = np.array([p[0] for p in points], dtype=float)
    bpd = np.array([p[1] for p in points])
    return [(int(length), float((earlier - value) / earlier))
            for length, value in zip(steps, bpd) if length >= since * run["iterations"] and 0.8 * length >= steps[0]
            for earlier in [np.interp(0.8 * length, steps, bpd)]]


def plateau_forecast(runs: Union[PathLike, Sequence[dict]], scale: str = "cpu", threshold: float = 0.01,
                     since: float = 0.5, horizon: float = 10.0) -> List[Dict[str, object]]:
    r"""Per (data set, model) of ``runs`` (run records, or a results folder whose finished runs of
    ``scale`` are read), the steps after which the last-fifth improvement would fall
    below ``threshold`` if it kept falling as it did over the runs' second half
    (:func:`late_improvement_curve` from ``since`` of the steps, mean over seeds at the lengths that
    every seed has). On the log scale, :math:`h(L) = \log b(0.8L) - \log b(L) = -\log(1 - f(L))`
    is fitted by least squares as :math:`h(L) = h_1 (L/L_1)^{-\alpha}` (exact when
    :math:`\log b(n) = c + D n^{-\alpha}`), so the forecast is
    :math:`n = L_1 (h_1 / -\log(1 - \text{threshold}))^{1/\alpha}`. An extrapolation, not a
    measurement. ``steps`` is the last length where the mean is already below the threshold (or the
    fit crosses it before the last length), and None where it does not fall (:math:`\alpha \le 0`)
    or would take more than ``horizon`` times the last length (``outcome`` says which); fewer than 3
    shared lengths or seeds of different lengths give no row. ``late_first`` / ``late_now``: the
    mean improvement at the first and last length fitted; ``curve``: (length, mean improvement) at
    every length fitted."""
    if isinstance(runs, (str, os.PathLike)):
        runs = _scale_runs(runs, scale)
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], _model_label(run)), []).append(run)
    out: List[Dict[str, object]] = []
    for (dataset, model), of_model in sorted(groups.items()):
        if len({r["iterations"] for r in of_model}) != 1:
            continue  # seeds of different lengths: no one curve to extrapolate
        curves = [dict(late_improvement_curve(r, since)) for r in of_model]
        lengths = sorted(set.intersection(*(set(c) for c in curves)))
        if len(lengths) < 3:
            continue
        improvement = np.array([np.mean([c[n] for c in curves]) for n in lengths])
        steps: Optional[int] = None
        alpha = float("nan")
        if improvement[-1] < threshold:
            steps, outcome = lengths[-1], "below the threshold"
        elif (improvement <= 0).any():
            outcome = "not falling"
        else:
            slope, intercept = np.polyfit(np.log(lengths), np.log(-np.log1p(-improvement)), 1)
            alpha = float(-slope)
            forecast = math.exp((math.log(-math.log1p(-threshold)) - intercept) / slope) if alpha > 0 else math.inf
            if alpha <= 0:
                outcome = "not falling"
            elif forecast > horizon * lengths[-1]:
                outcome = f"beyond {horizon:g} times the length"
            else:
                steps, outcome = max(int(math.ceil(forecast)), lengths[-1]), "forecast"  # a fit below the last mean: now
        out.append({"dataset": dataset, "model": model, "seeds": len(of_model), "first_length": lengths[0],
                    "late_first": float(improvement[0]), "last_length": lengths[-1], "late_now": float(improvement[-1]),
                    "lengths": len(lengths), "exponent": alpha, "steps": steps, "outcome": outcome,
                    "curve": list(zip(lengths, improvement.tolist()))})
    return out


def compare_models(table, better: str, worse: str) -> List[Dict[str, object]]:
    """Per data set, at the longest run length both models have: the mean bpd of ``worse`` minus
    that of ``better`` (positive: ``better`` is lower, as the paper claims) and that gap over its
    standard error from the seed spreads (None with fewer than two seeds of either model, where
    the gap cannot be told from noise)."""
    out = []
    for dataset in sorted(set(table["dataset"])) if len(table) else []:
        rows = {m: table[(table["dataset"] == dataset) & (table["model"] == m)] for m in (better, worse)}
        common = set(rows[better]["steps"]) & set(rows[worse]["steps"])  # only runs of equal length compare
        if not common:
            continue
        steps = max(common)
        a, b = (rows[m][rows[m]["steps"] == steps].iloc[0] for m in (better, worse))
        gap = float(b["bpd_mean"] - a["bpd_mean"])
        error = None
        if a["n_seeds"] >= 2 and b["n_seeds"] >= 2:
            error = float(np.sqrt(a["bpd_std_over_seeds"] ** 2 / a["n_seeds"] + b["bpd_std_over_seeds"] ** 2 / b["n_seeds"]))
        out.append({"dataset": dataset, "steps": int(steps), "better": better, "worse": worse, "gap": gap,
                    "standard_error": error, "gap_over_error": gap / error if error else None,
                    "seeds": (int(a["n_seeds"]), int(b["n_seeds"]))})
    return out

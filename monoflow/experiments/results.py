"""The results layout: run records on disk, and tables that aggregate them next to the paper.

Layout (relative to a results folder, ``results/`` by default)::

    toy2d/<preset>/<model>/<dataset>/seed<k>/
        run.json        the run record (below)
        figure.png      data histogram | model density exp(log p) on [-4, 4]^2 | model samples
        figure.npz      the arrays behind figure.png (data, grid, density, samples)
        checkpoint.pt   resumable state (never committed)
        train.log       timestamped log
    regression1d/<preset>/<model>/seed<k>/
        run.json, fit.png, fit.npz (x, target, prediction), checkpoint.pt, train.log
    tables/
        table1_toy2d_<preset>.csv        one row per data set x model, with the paper's nats
        figure4_regression1d_<preset>.csv one row per 1-D model, with the paper's MSE

run.json holds: ``experiment``, ``status`` ("finished"), ``preset``, ``model``, ``dataset`` (2-D),
``seed``, ``metric_name`` (``nll_nats`` or ``mse``), ``final_metric`` (mean of the last
``report_last`` tests), ``tests`` (the whole test curve: iteration, metric, train loss, learning
rate, inverse round-trip error, solver statistics of the test and of the training step),
``config``, ``parameters``, ``provenance`` (package version, git commit, torch version, device,
Python, platform, time), ``timing`` (wall time, iterations, per-iteration time and its breakdown
into data / forward / backward / optimizer), ``solver`` (statistics of the last test) and
``lipschitz`` (the certified bound of Lip(g) of each block, :func:`lipschitz_certificates`; runs
finished before it was recorded lack it).
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from monoflow.checkpoint import atomic_write_text
from monoflow.experiments.config import config_to_dict, regression_config, toy_config
from monoflow.lipschitz import certificates_record

__all__ = [
    "RUN_NAME",
    "CHECKPOINT_NAME",
    "LOG_NAME",
    "EXPERIMENTS",
    "run_directory",
    "load_run",
    "find_runs",
    "toy_table",
    "toy_seed_spread",
    "late_improvement",
    "regression_table",
    "write_tables",
    "paper_toy_numbers",
    "paper_regression_numbers",
    "write_run",
    "to_jsonable",
    "summarize_solver",
    "lipschitz_certificates",
    "rerun_commands",
]

RUN_NAME = "run.json"
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train.log"
EXPERIMENTS = ("toy2d", "regression1d")
PathLike = Union[str, os.PathLike]


def run_directory(config: Any, output_dir: PathLike = "results") -> Path:
    """The folder of the run ``config`` describes (see the module doc for the layout)."""
    root = Path(output_dir) / config.experiment / config.preset / config.model
    if config.experiment == "toy2d":
        root = root / config.dataset
    return root / f"seed{config.seed}"


def to_jsonable(value: Any) -> Any:
    """Plain JSON types for tensors, numpy values, tuples and nested containers (NaN stays NaN)."""
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist()) if value.numel() != 1 else float(value.item())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value


def summarize_solver(stats: Any, kinds: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Flatten the core's ``solver_stats(model)`` into ``{"forward_iterations_mean": ..., ...}``.

    Nested dictionaries become ``outer_inner`` keys; tensors become numbers or lists. With
    ``kinds`` (e.g. ``("forward", "adjoint")``) only keys starting with one of them are kept: the
    core remembers each block's last solve of every kind, so a training step's statistics would
    otherwise include the inverse solves of the previous test.
    """
    flat: Dict[str, Any] = {}

    def walk(prefix: str, item: Any) -> None:
        if isinstance(item, dict):
            for key, inner in item.items():
                walk(f"{prefix}_{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = to_jsonable(item)

    walk("", stats if stats is not None else {})
    if kinds is not None:
        flat = {key: value for key, value in flat.items() if key.split("_", 1)[0] in kinds}
    return flat


def write_run(run_dir: PathLike, record: Dict[str, Any]) -> Path:
    """Write ``record`` as ``run_dir/run.json`` atomically; returns the path."""
    path = Path(run_dir) / RUN_NAME
    atomic_write_text(path, json.dumps(to_jsonable(record), indent=1, allow_nan=True) + "\n")
    return path


def load_run(run_dir: PathLike) -> Dict[str, Any]:
    """The record of one run: ``run_dir/run.json`` (or a path to the file itself), plus ``run_dir``."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / RUN_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {RUN_NAME} at {path} (is the run finished?)")
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a valid run record ({error}); delete it and rerun the run's command "
                         "(it is rewritten from the checkpoint, or the run starts afresh)") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a run record (a JSON {type(record).__name__}, not an object); delete it "
                         "and rerun the run's command")
    record["run_dir"] = str(path.parent)
    return record


def find_runs(
    results_dir: PathLike = "results", experiment: str = "toy2d", preset: Optional[str] = None
) -> List[Dict[str, Any]]:
    """All finished runs of ``experiment`` (``"toy2d"`` or ``"regression1d"``) under ``results_dir``.

    Optionally only those of ``preset``. Sorted by model, data set and seed.
    """
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; valid: {', '.join(EXPERIMENTS)}")
    root = Path(results_dir) / experiment
    if preset is not None:
        root = root / preset
    if not root.is_dir():
        return []
    runs = [load_run(path.parent) for path in sorted(root.rglob(RUN_NAME))]
    runs = [run for run in runs if run.get("status") == "finished" and run.get("experiment") == experiment]
    return sorted(runs, key=lambda run: (run["preset"], run["model"], run.get("dataset") or "", run["seed"]))


def _paper_csv(name: str) -> pd.DataFrame:
    with resources.files("monoflow.paper_data").joinpath(name).open("r", encoding="utf-8") as handle:
        return pd.read_csv(handle)


def paper_toy_numbers() -> pd.DataFrame:
    """The paper's Table 1 in long form: columns dataset, model, paper_nats."""
    wide = _paper_csv("table1_toy2d_nats.csv")
    long = wide.melt(id_vars="dataset", var_name="model", value_name="paper_nats")
    long["model"] = long["model"].str.replace("_nats", "", regex=False)
    return long


def paper_regression_numbers() -> pd.DataFrame:
    """The paper's Figure 4 MSEs: columns model, paper_mse (NaN where unreadable), paper_note."""
    frame = _paper_csv("figure4_1d_mse.csv")
    return frame.rename(columns={"note": "paper_note"})[["model", "paper_mse", "paper_note"]]


def _aggregate(runs: List[Dict[str, Any]], keys: List[str]) -> pd.DataFrame:
    rows = []
    for run in runs:
        together = (run.get("ensemble") or {}).get("size", 1)
        rows.append({
            **{key: run.get(key) for key in keys},
            "seed": run["seed"],
            "metric": run["final_metric"],
            "iterations": run["timing"]["iterations"],
            # a run trained with others in one ensemble gets its share of the ensemble's time
            "wall_time_s": run["timing"]["wall_time_s"] / together,
            "trained_together": together,
            "device": run["provenance"]["device"],
        })
    columns = keys + ["seeds", "metric_mean", "metric_std", "iterations", "wall_time_s", "trained_together", "device"]
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows)
    grouped = frame.groupby(keys, sort=True)
    table = grouped.agg(
        seeds=("seed", "count"),
        metric_mean=("metric", "mean"),
        metric_std=("metric", "std"),
        iterations=("iterations", "max"),
        wall_time_s=("wall_time_s", "mean"),
        trained_together=("trained_together", "max"),
        device=("device", lambda devices: ", ".join(sorted(set(devices)))),
    )
    return table.reset_index()[columns]


def toy_table(results_dir: PathLike = "results", preset: Optional[str] = None) -> pd.DataFrame:
    """Table 1 from the finished 2-D runs, one row per data set x model x preset.

    Columns: dataset, model, preset, seeds (number of seeds), nll_nats_mean, nll_nats_std (over
    seeds; NaN for one seed), paper_nats (NaN for models the paper does not report),
    difference (ours - paper), iterations, wall_time_s (mean over seeds; a run trained in an
    ensemble counts the ensemble's wall time divided by its number of runs), trained_together (the
    largest such number among the seeds; 1: every seed trained alone), device.
    """
    runs = find_runs(results_dir, "toy2d", preset)
    table = _aggregate(runs, ["dataset", "model", "preset"])
    table = table.rename(columns={"metric_mean": "nll_nats_mean", "metric_std": "nll_nats_std"})
    table = table.merge(paper_toy_numbers(), on=["dataset", "model"], how="left")
    table["difference"] = table["nll_nats_mean"] - table["paper_nats"]
    columns = ["dataset", "model", "preset", "seeds", "nll_nats_mean", "nll_nats_std", "paper_nats",
               "difference", "iterations", "wall_time_s", "trained_together", "device"]
    return table[columns].reset_index(drop=True)


def toy_seed_spread(table: pd.DataFrame, min_seeds: int = 2) -> pd.DataFrame:
    r"""Is the paper's gap between i-DenseNet and Monotone Flow larger than the seed noise?

    From :func:`toy_table` rows, per data set and preset where both models have at least
    ``min_seeds`` seeds: means and standard deviations over seeds, our gap and the paper's gap
    (i-DenseNet minus Monotone Flow; positive: Monotone Flow is better), and
    ``single_run_gap_std`` :math:`=\sqrt{s_i^2 + s_m^2}`, the standard deviation of the gap
    between two single runs (the paper reports one run per cell). ``paper_gap_in_stds`` is the
    paper's gap in units of that standard deviation: below 2, one run per cell cannot tell the
    two models apart.
    """
    columns = ["dataset", "preset", "seeds", "monotone_mean", "monotone_std", "idensenet_mean",
               "idensenet_std", "gap_ours", "gap_paper", "single_run_gap_std", "paper_gap_in_stds"]
    rows = []
    for (dataset, preset), part in table.groupby(["dataset", "preset"], sort=True):
        cells = part.set_index("model")
        if not {"monotone", "idensenet"} <= set(cells.index):
            continue
        mono, dense = cells.loc["monotone"], cells.loc["idensenet"]
        seeds = int(min(mono["seeds"], dense["seeds"]))
        if seeds < min_seeds:
            continue
        noise = float(np.hypot(mono["nll_nats_std"], dense["nll_nats_std"]))
        gap_paper = float(dense["paper_nats"] - mono["paper_nats"])
        rows.append({
            "dataset": dataset, "preset": preset, "seeds": seeds,
            "monotone_mean": mono["nll_nats_mean"], "monotone_std": mono["nll_nats_std"],
            "idensenet_mean": dense["nll_nats_mean"], "idensenet_std": dense["nll_nats_std"],
            "gap_ours": dense["nll_nats_mean"] - mono["nll_nats_mean"], "gap_paper": gap_paper,
            "single_run_gap_std": noise, "paper_gap_in_stds": abs(gap_paper) / noise if noise > 0 else float("inf"),
        })
    return pd.DataFrame(rows, columns=columns)


def late_improvement(record: Dict[str, Any]) -> float:
    """How much a run's test metric still fell at the end: the mean over the third quarter of its
    test curve minus the mean over the fourth (positive: still improving; NaN below 4 tests)."""
    metrics = [test["metric"] for test in record.get("tests", [])]
    n = len(metrics)
    if n < 4:
        return float("nan")
    return float(np.mean(metrics[n // 2:(3 * n) // 4]) - np.mean(metrics[(3 * n) // 4:]))


def regression_table(results_dir: PathLike = "results", preset: Optional[str] = None) -> pd.DataFrame:
    """Figure 4's numbers from the finished 1-D runs, one row per model x preset.

    Columns: model, preset, mse (mean over seeds of the final test MSE), paper_mse (NaN where the
    source is unreadable), iterations, wall_time_s, device, seeds, mse_std, paper_note.
    """
    runs = find_runs(results_dir, "regression1d", preset)
    table = _aggregate(runs, ["model", "preset"])
    table = table.rename(columns={"metric_mean": "mse", "metric_std": "mse_std"})
    table = table.merge(paper_regression_numbers(), on="model", how="left")
    columns = ["model", "preset", "mse", "paper_mse", "iterations", "wall_time_s", "device", "seeds",
               "mse_std", "paper_note"]
    return table[columns].reset_index(drop=True)


def write_tables(results_dir: PathLike = "results", preset: Optional[str] = None) -> List[Path]:
    """Write the aggregated tables as CSV under ``results_dir/tables/``; returns the paths written."""
    tables_dir = Path(results_dir) / "tables"
    written = []
    for name, build in (("table1_toy2d", toy_table), ("figure4_regression1d", regression_table)):
        table = build(results_dir, preset)
        for table_preset, part in table.groupby("preset"):
            path = tables_dir / f"{name}_{table_preset}.csv"
            atomic_write_text(path, part.to_csv(index=False, float_format="%.6g"))
            written.append(path)
    return written


def lipschitz_certificates(runs: Sequence[Dict[str, Any]], from_checkpoints: bool = True) -> pd.DataFrame:
    r"""The Lipschitz certificates of finished toy and 1-D runs (:func:`find_runs`), one row per run.

    A block is invertible only if :math:`\mathrm{Lip}(g) < 1`; a finished run records a rigorous
    upper bound of each block's :math:`\mathrm{Lip}(g)` in ``run.json["lipschitz"]``
    (:func:`monoflow.lipschitz.certificates_record`). Runs finished before that record existed
    lack it; for those, with ``from_checkpoints``, the bounds are computed from the run's
    ``checkpoint.pt`` if it is there and belongs to the same configuration.

    Columns: experiment, preset, model, dataset (None for 1-D runs), seed, bound_max (the
    largest bound over the run's blocks), all_below_one, source (``"run.json"``,
    ``"checkpoint"``, or ``"none"`` where neither holds them: bound_max is then NaN and
    all_below_one None), run_dir.
    """
    rows = []
    for run in runs:
        certificates, source = run.get("lipschitz"), "run.json"
        if certificates is None and from_checkpoints:
            certificates, source = _certificates_from_checkpoint(run), "checkpoint"
        if certificates is None:
            source = "none"
        rows.append({
            "experiment": run.get("experiment"), "preset": run.get("preset"), "model": run.get("model"),
            "dataset": run.get("dataset"), "seed": run.get("seed"),
            "bound_max": float("nan") if certificates is None or certificates["bound_max"] is None
            else float(certificates["bound_max"]),
            "all_below_one": None if certificates is None else bool(certificates["all_below_one"]),
            "source": source, "run_dir": run.get("run_dir"),
        })
    columns = ["experiment", "preset", "model", "dataset", "seed", "bound_max", "all_below_one", "source", "run_dir"]
    return pd.DataFrame(rows, columns=columns)


def _certificates_from_checkpoint(run: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """``certificates_record`` of the model in the run's checkpoint, or None without one (or with
    one of another configuration: a run extended since its record was written)."""
    from monoflow.experiments.evaluate import load_model  # it imports this module

    if not run.get("run_dir") or not (Path(run["run_dir"]) / CHECKPOINT_NAME).is_file():
        return None
    path = Path(run["run_dir"]) / CHECKPOINT_NAME
    model, config = load_model(path)
    if config_to_dict(config) != run.get("config"):
        return None
    return to_jsonable(certificates_record(model))


def rerun_commands(runs: Sequence[Dict[str, Any]], output: str = "results-rerun") -> List[str]:
    """The ``monoflow table1`` / ``monoflow figure4`` commands that train ``runs`` again into the
    results folder ``output``.

    Fields that differ from the preset are given as ``--set``. Each command trains every
    combination of the data sets, models and seeds it names; together they train exactly
    ``runs``. A folder that holds a finished run returns its record without training, hence a new
    ``output`` to re-create runs whose records predate a field (the Lipschitz certificates).
    """
    seeds: Dict[tuple, set] = {}  # (experiment, preset, changed fields, model, data set) -> seeds
    for run in runs:
        experiment = run["experiment"]
        if experiment not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {experiment!r} in {run.get('run_dir')}; valid: {', '.join(EXPERIMENTS)}")
        if experiment == "toy2d":
            preset = config_to_dict(toy_config(run["preset"], dataset=run["dataset"], model=run["model"], seed=run["seed"]))
        else:
            preset = config_to_dict(regression_config(run["preset"], model=run["model"], seed=run["seed"]))
        changed = tuple(sorted((key, _command_value(value)) for key, value in run["config"].items()
                               if key in preset and value != preset[key]))
        seeds.setdefault((experiment, run["preset"], changed, run["model"], run.get("dataset")), set()).add(int(run["seed"]))
    # a command trains every data set x model x seed it names: group so that each is a full product
    datasets: Dict[tuple, set] = {}
    for (experiment, preset, changed, model, dataset), cell_seeds in seeds.items():
        datasets.setdefault((experiment, preset, changed, model, tuple(sorted(cell_seeds))), set()).add(dataset)
    models: Dict[tuple, set] = {}
    for (experiment, preset, changed, model, cell_seeds), cell_datasets in datasets.items():
        names = tuple(sorted(name for name in cell_datasets if name))
        models.setdefault((experiment, preset, changed, cell_seeds, names), set()).add(model)
    commands = []
    for (experiment, preset, changed, cell_seeds, names), cell_models in sorted(models.items()):
        words = ["monoflow", "table1" if experiment == "toy2d" else "figure4", "--preset", preset]
        words += ["--datasets", *names] if names else []
        words += ["--models", *sorted(cell_models), "--seeds", *map(str, cell_seeds)]
        for key, value in changed:
            words += ["--set", f"{key}={value}"]
        commands.append(" ".join(words + ["-o", output]))
    return commands


def _command_value(value: Any) -> str:
    """A configuration value as ``--set`` reads it (tuples comma separated)."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

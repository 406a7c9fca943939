"""``monoflow toy2d | regression1d | table1 | figure4 | evaluate | sample``: the small experiments.

* ``toy2d``: one 2-D density run (one data set, one model, one seed);
* ``regression1d``: one 1-D staircase run;
* ``table1``: every 2-D run of the paper's Table 1 (data sets x models x seeds), then the table;
* ``figure4``: every 1-D run of the paper's Figure 4, then the table and the figure;
* ``evaluate``: recompute the test metric of a checkpoint on fresh data;
* ``sample``: draw samples of a 2-D checkpoint (``.npy`` and ``.png``).

Runs resume from their checkpoints and finished runs are skipped, so rerunning a command after
an interruption continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Sequence

from monoflow.cli.options import Deprecated

__all__ = ["register"]


def _presets() -> Sequence[str]:
    from monoflow.experiments.config import PRESETS

    return PRESETS


def _add_common(parser: argparse.ArgumentParser, seeds: bool = False) -> None:
    parser.add_argument("--preset", choices=_presets(), default="quick",
                        help="settings: 'paper' (exactly the paper's) or 'quick' (minutes on a laptop CPU); "
                        "default: quick")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one configuration field, e.g. --set iterations=300 (repeatable; "
                        "tuples comma separated: --set lr_milestones=500,1000); an unknown key lists the valid ones")
    if seeds:
        parser.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                            help="seeds to run, e.g. --seeds 0 1 2 (default: 0)")
    else:
        parser.add_argument("--seed", type=int, default=None,
                            help="random seed of model initialisation and data (default: the preset's, 0)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--output", "-o", type=Path, default=Path("results"),
                        help="results folder (default: results); runs go to OUTPUT/<experiment>/<preset>/...")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); the small 2-D and 1-D models are "
                        "often fastest with 1, especially on a busy machine")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_compile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="train with the loss compiled into one graph (torch.compile): Newton solves of fixed length instead of Anderson to a tolerance, "
                        "same loss and gradients up to the solves' residuals, several times fewer operators "
                        "per iteration; compiling takes minutes once per architecture; tests and figures "
                        "are computed as without it")


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def _overrides(cls: type, args: argparse.Namespace, **fixed: Any) -> Dict[str, Any]:
    """Typed ``--set`` values plus the options given explicitly (``--seed``, ``--model``, ...)."""
    from monoflow.experiments.config import parse_overrides

    values = parse_overrides(cls, args.overrides)
    values.update({key: value for key, value in fixed.items() if value is not None})
    return values


def _summary(record: Dict[str, Any]) -> str:
    if record.get("status") != "finished":
        return f"stopped at iteration {record['step']} (rerun the same command to resume)"
    timing = record["timing"]
    return (
        f"{record['metric_name']} = {record['final_metric']:.6g} ({record['final_metric_definition']}); "
        f"{timing['iterations']} iterations in {timing['wall_time_s']:.1f} s "
        f"({1000 * timing['per_iteration_s']:.1f} ms/iteration); {record['run_dir']}"
    )


def _exit_code(record: Dict[str, Any]) -> int:
    """0, or 128 + the signal that stopped the run (it saved a checkpoint first)."""
    return 128 + int(record["signal"]) if record.get("signal") else 0


def _toy2d(args: argparse.Namespace) -> int:
    from monoflow.experiments import ToyConfig, run_toy, toy_config
    from monoflow.experiments.results import run_directory

    _set_threads(args)
    config = toy_config(args.preset, **_overrides(ToyConfig, args, dataset=args.dataset, model=args.model, seed=args.seed))
    record = run_toy(config, args.output, args.device, progress=not args.no_progress, stop_after=args.stop_after,
                     compile=args.compile)
    record.setdefault("run_dir", str(run_directory(config, args.output)))
    print(_summary(record))
    return _exit_code(record)


def _regression1d(args: argparse.Namespace) -> int:
    from monoflow.experiments import RegressionConfig, regression_config, run_regression
    from monoflow.experiments.results import run_directory

    _set_threads(args)
    config = regression_config(args.preset, **_overrides(RegressionConfig, args, model=args.model, seed=args.seed))
    record = run_regression(config, args.output, args.device, progress=not args.no_progress, stop_after=args.stop_after)
    record.setdefault("run_dir", str(run_directory(config, args.output)))
    print(_summary(record))
    return _exit_code(record)


def _close(figure: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)


def _print_table(table: Any) -> None:
    import pandas as pd

    with pd.option_context("display.max_rows", 200, "display.max_columns", 20, "display.width", 160):
        print(table.to_string(index=False))


def _train_together(configs: Sequence[Any], args: argparse.Namespace) -> int:
    """Per model, the runs not finished or started alone, trained as one ensemble. Returns
    :func:`_exit_code` of an ensemble stopped by a signal, else 0."""
    from monoflow.experiments.toy2d_ensemble import pending_members, run_toy_ensemble

    for model in args.models:
        pending = pending_members([c for c in configs if c.model == model], args.output)
        if len(pending) < 2:
            continue  # one run alone is an ordinary run
        names = ", ".join(f"{c.dataset}:{c.seed}" for c in pending)
        print(f"[together] {model}: {len(pending)} runs as one ensemble ({names})", flush=True)
        record = run_toy_ensemble(pending, args.output, args.device, progress=not args.no_progress)
        if record.get("status") != "finished":
            print("    " + _summary(record), flush=True)
            return _exit_code(record)
        for member in record.get("members", []):
            print(f"    {member['dataset']} seed {member['seed']}: nll_nats={member['final_metric']:.4f}", flush=True)
    return 0


def _table1(args: argparse.Namespace) -> int:
    from monoflow.experiments import ToyConfig, run_toy, toy_config, toy_table, write_tables
    from monoflow.experiments.figures import plot_toy_grid

    _set_threads(args)
    base = _overrides(ToyConfig, args)
    configs = [
        toy_config(args.preset, **{**base, "dataset": dataset, "model": model, "seed": seed})
        for seed in args.seeds
        for dataset in args.datasets
        for model in args.models
    ]
    if args.together and args.compile:
        raise ValueError("--compile and --together cannot be combined: runs trained together use the "
                         "batched eager model; choose one")
    if args.together:
        stopped = _train_together(configs, args)
        if stopped:
            return stopped
    for index, config in enumerate(configs, start=1):
        print(f"[{index}/{len(configs)}] {config.model} on {config.dataset}, seed {config.seed}", flush=True)
        record = run_toy(config, args.output, args.device, progress=not args.no_progress, compile=args.compile)
        print("    " + _summary(record), flush=True)
        if record.get("status") != "finished":
            return _exit_code(record)
    write_tables(args.output, args.preset)
    figure = plot_toy_grid(args.output, args.preset, args.models, args.datasets, seed=args.seeds[0])
    figure_path = Path(args.output) / "toy2d" / args.preset / "figure5.png"
    figure.savefig(figure_path, dpi=100)
    _close(figure)
    table = toy_table(args.output, args.preset)
    _print_table(table[table["dataset"].isin(args.datasets) & table["model"].isin(args.models)])
    print(f"tables in {Path(args.output) / 'tables'}; figure {figure_path}")
    return 0


def _figure4(args: argparse.Namespace) -> int:
    from monoflow.experiments import RegressionConfig, regression_config, regression_table, run_regression, write_tables
    from monoflow.experiments.figures import plot_regression_fits

    _set_threads(args)
    base = _overrides(RegressionConfig, args)
    configs = [
        regression_config(args.preset, **{**base, "model": model, "seed": seed})
        for seed in args.seeds
        for model in args.models
    ]
    for index, config in enumerate(configs, start=1):
        print(f"[{index}/{len(configs)}] {config.model}, seed {config.seed}", flush=True)
        record = run_regression(config, args.output, args.device, progress=not args.no_progress)
        print("    " + _summary(record), flush=True)
        if record.get("status") != "finished":
            return _exit_code(record)
    write_tables(args.output, args.preset)
    figure = plot_regression_fits(args.output, args.preset, args.models, seed=args.seeds[0])
    figure_path = Path(args.output) / "regression1d" / args.preset / "figure4.png"
    figure.savefig(figure_path, dpi=100)
    _close(figure)
    table = regression_table(args.output, args.preset)
    _print_table(table[table["model"].isin(args.models)])
    print(f"tables in {Path(args.output) / 'tables'}; figure {figure_path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from monoflow.experiments.evaluate import evaluate_checkpoint

    _set_threads(args)
    result = evaluate_checkpoint(args.checkpoint, samples=args.samples, seed=args.seed, device=args.device)
    print(json.dumps(result, indent=1))
    return 0


def _sample(args: argparse.Namespace) -> int:
    import numpy as np

    from monoflow.experiments.evaluate import sample_checkpoint
    from monoflow.experiments.figures import save_samples_figure

    _set_threads(args)
    samples = sample_checkpoint(args.checkpoint, args.n, seed=args.seed, device=args.device)
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    npy, png = prefix.with_suffix(".npy"), prefix.with_suffix(".png")
    np.save(npy, samples)
    save_samples_figure(samples, png, title=f"{args.n} samples")
    print(f"wrote {npy} and {png}")
    return 0


_STOP_HELP = "stop with a checkpoint after this many iterations in total (rerun to resume)"


def _register_toy2d(subparsers: argparse._SubParsersAction) -> None:
    """``monoflow toy2d``: one 2-D density run."""
    from monoflow.data.toy import TOY_DATASETS
    from monoflow.experiments.config import TOY_MODELS

    parser = subparsers.add_parser(
        "toy2d", help="train one 2-D toy density model (a cell of Table 1)",
        description="Train one flow on one 2-D toy data set, test its NLL (nats) on fresh samples, and "
        "write run.json, figure.png and a checkpoint to OUTPUT/toy2d/<preset>/<model>/<dataset>/seed<k>. "
        "Rerunning resumes from the checkpoint; a finished run is not trained again.",
    )
    parser.add_argument("--dataset", choices=TOY_DATASETS, required=True, help="the toy data set")
    parser.add_argument("--model", choices=TOY_MODELS, default="monotone",
                        help="monotone (Monotone Flow, CPila), idensenet (i-DenseNet, CLipSwish) or "
                        "resflow (Residual Flow); default: monotone")
    _add_common(parser)
    _add_compile(parser)
    parser.add_argument("--stop-after", type=int, default=None, metavar="N", help=_STOP_HELP)
    parser.set_defaults(handler=_toy2d)


def _register_regression1d(subparsers: argparse._SubParsersAction) -> None:
    """``monoflow regression1d``: one 1-D staircase run."""
    from monoflow.experiments.config import REGRESSION_MODELS

    parser = subparsers.add_parser(
        "regression1d", help="fit one 1-D model to the staircase (a panel of Figure 4)",
        description="Fit one two-block 1-D flow to the staircase target by MSE and write run.json, "
        "fit.png and a checkpoint to OUTPUT/regression1d/<preset>/<model>/seed<k>. Resumable.",
    )
    parser.add_argument("--model", choices=REGRESSION_MODELS, default="monotone_actnorm",
                        help="(a) residual, (b) residual_actnorm, (c) implicit_actnorm, (d) monotone_actnorm; "
                        "default: monotone_actnorm")
    _add_common(parser)
    parser.add_argument("--stop-after", type=int, default=None, metavar="N", help=_STOP_HELP)
    parser.set_defaults(handler=_regression1d)


def _register_table1(subparsers: argparse._SubParsersAction) -> None:
    """``monoflow table1``: every 2-D run of Table 1, then the table."""
    from monoflow.data.toy import TOY_DATASETS
    from monoflow.experiments.config import TOY_MODELS

    parser = subparsers.add_parser(
        "table1", help="run every cell of Table 1 (2-D NLL) and write the table",
        description="Train every data set x model x seed (finished runs are skipped, interrupted ones "
        "resume), then write OUTPUT/tables/table1_toy2d_<preset>.csv next to the paper's numbers and "
        "OUTPUT/toy2d/<preset>/figure5.png.",
    )
    parser.add_argument("--datasets", nargs="+", choices=TOY_DATASETS, default=list(TOY_DATASETS),
                        metavar="DATASET", help=f"data sets (default: all of {', '.join(TOY_DATASETS)})")
    parser.add_argument("--models", nargs="+", choices=TOY_MODELS, default=["idensenet", "monotone"],
                        metavar="MODEL", help=f"models among {', '.join(TOY_MODELS)} (default: idensenet monotone)")
    parser.add_argument("--together", action="store_true",
                        help="train the unfinished runs of each model together as one batched model "
                        "(monoflow.ensemble): every run as if alone up to rounding, but one process "
                        "and one pass per iteration for all of them; the ensemble's checkpoint and log "
                        "are in OUTPUT/ensembles/, each run's results in its usual folder")
    _add_common(parser, seeds=True)
    _add_compile(parser)
    parser.set_defaults(handler=_table1)


def _register_figure4(subparsers: argparse._SubParsersAction) -> None:
    """``monoflow figure4``: every 1-D run of Figure 4, then the table and the figure."""
    from monoflow.experiments.config import REGRESSION_MODELS

    parser = subparsers.add_parser(
        "figure4", help="run the four 1-D models of Figure 4 and draw the figure",
        description="Fit every 1-D model x seed (finished runs are skipped, interrupted ones resume), then "
        "write OUTPUT/tables/figure4_regression1d_<preset>.csv and OUTPUT/regression1d/<preset>/figure4.png.",
    )
    parser.add_argument("--models", nargs="+", choices=REGRESSION_MODELS, default=list(REGRESSION_MODELS),
                        metavar="MODEL", help=f"models (default: all of {', '.join(REGRESSION_MODELS)})")
    _add_common(parser, seeds=True)
    parser.set_defaults(handler=_figure4)


def _register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    """``monoflow evaluate``: the test metric of a checkpoint on fresh data."""
    parser = subparsers.add_parser(
        "evaluate", help="recompute the test metric of a checkpoint on fresh data",
        description="Rebuild the model of a run from its checkpoint, test it on fresh data (2-D: NLL in "
        "nats; 1-D: MSE) with the inverse round-trip error and solver statistics, print JSON.",
    )
    parser.add_argument("checkpoint", type=Path, help="a run folder or its checkpoint.pt")
    parser.add_argument("--samples", type=int, default=None,
                        help="number of fresh test points (default: the run's test_samples)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh test data (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(handler=_evaluate)


def _register_sample(subparsers: argparse._SubParsersAction) -> None:
    """``monoflow sample``: samples of a 2-D checkpoint."""
    parser = subparsers.add_parser(
        "sample", help="draw samples of a 2-D checkpoint (.npy and .png)",
        description="Rebuild a 2-D model from its checkpoint and draw samples x = F^-1(z), z ~ N(0, I); "
        "writes PREFIX.npy (shape (n, 2)) and PREFIX.png (histogram).",
    )
    parser.add_argument("checkpoint", type=Path, help="a toy2d run folder or its checkpoint.pt")
    parser.add_argument("--n", type=int, default=10000, help="number of samples (default: 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base samples (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("samples"), metavar="PREFIX",
                        help="files to write, without suffix (default: samples -> samples.npy, samples.png)")
    parser.add_argument("--output", "-o", dest="out", type=Path, action=Deprecated, replacement="--out PREFIX")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(handler=_sample)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the experiment subcommands to the ``monoflow`` command line."""
    _register_toy2d(subparsers)
    _register_regression1d(subparsers)
    _register_table1(subparsers)
    _register_figure4(subparsers)
    _register_evaluate(subparsers)
    _register_sample(subparsers)

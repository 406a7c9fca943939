"""``monoflow table2``: train the image runs of a scale and collect them into Table 2 and its ablation.

Examples::

    monoflow table2 --scale cpu                                  # collect: results/tables/table2_*_cpu.csv
    monoflow table2 --scale cpu --train --seeds 0 1 2 --threads 1  # train what is missing, then collect
    monoflow table2 --scale paper --data-root ~/data --train       # the paper's presets on a GPU
    monoflow table2 --scale cpu --plan                           # what is left to train, and how long

Rerunning a ``--train`` command resumes unfinished runs and skips finished ones; two such commands
started side by side share the list (a run that one trains, the other skips).
"""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]


def _print_plan(args: argparse.Namespace, images_dir: Path) -> int:
    import pandas as pd

    from monoflow.images.table2 import training_plan

    plan = training_plan(args.scale, args.seeds, images_dir, args.presets, args.models)
    rows = []
    for run in plan.itertuples():
        hours = "" if run.state == "finished" else "?" if pd.isna(run.hours_left) else f"{run.hours_left:.2f}"
        rows.append({"preset": run.preset, "model": run.model, "seed": run.seed,
                     "state": f"{run.state} ({run.in_use_by})" if isinstance(run.in_use_by, str) else run.state,
                     "steps": f"{run.steps_done}/{'?' if pd.isna(run.steps) else int(run.steps)}", "hours left": hours})
    print(pd.DataFrame(rows).to_string(index=False))
    for problem in plan["problem"].dropna():
        print(problem)
    left = plan[plan["state"] != "finished"]
    untimed = int(left["hours_left"].isna().sum())
    parts = []
    if len(left) > untimed:
        parts.append(f"{left['hours_left'].sum():.1f} hours of one process at the finished runs' pace")
    if untimed:
        parts.append(f"{untimed} with no finished run of their preset and model to time them by")
    print(f"{len(plan) - len(left)} of {len(plan)} runs finished; {len(left)} left" + (": " + "; ".join(parts) if parts else ""))
    return 0


def _table2(args: argparse.Namespace) -> int:
    from monoflow.cli.images import parse_image_overrides
    from monoflow.images.table2 import TABLE2_SCALES, planned_runs, train_scale, write_table2

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    images_dir = Path(args.output) / "images"
    if args.plan:
        if args.train or args.overrides:
            raise ValueError("--plan only reports what is left; run it without --train and --set")
        return _print_plan(args, images_dir)
    model_overrides, training_overrides = parse_image_overrides(args.overrides)
    if (model_overrides or training_overrides) and not args.train:
        raise ValueError("--set changes the runs that --train makes; without --train there is nothing to change")
    if args.train:
        planned_runs(args.scale, args.seeds, args.presets, args.models)  # refuse unknown names first
        outcome = train_scale(args.scale, args.seeds, results_dir=images_dir, presets=args.presets,
                              models=args.models, data_root=args.data_root, device=args.device,
                              progress=not args.no_progress, model_overrides=model_overrides or None,
                              training_overrides=training_overrides or None)
        print("; ".join(f"{k.replace('_', ' ')}: {len(v)}" for k, v in outcome.items()))
        if outcome["stopped"]:
            return 0
    paths = write_table2(images_dir, args.scale, Path(args.output) / "tables")
    for path in paths:
        print(path)
    print(f"({TABLE2_SCALES[args.scale].description})")
    return 0


def register(subparsers) -> None:
    from monoflow.images.table2 import TABLE2_SCALES

    parser = subparsers.add_parser("table2", help="Table 2 (images) and its ablation: train a scale's runs, collect them",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(TABLE2_SCALES), default="cpu",
                        help="which runs: cpu (real offline data, 2 CPU cores), paper (GPUs), quick (default: cpu)")
    parser.add_argument("--train", action="store_true", help="train the scale's unfinished runs first")
    parser.add_argument("--plan", action="store_true",
                        help="list the scale's runs (finished, in use, partial, not started) and the hours left; "
                        "trains and writes nothing")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                        help="seeds to train (default: 0 1 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change one field of every run's model or training config (repeatable); use another "
                        "-o so that the changed runs do not mix with the preset's")
    parser.add_argument("--presets", nargs="+", default=None, metavar="PRESET", help="train only these presets")
    parser.add_argument("--models", nargs="+", default=None, metavar="MODEL", help="train only these models")
    parser.add_argument("--output", "-o", type=Path, default=Path("results"),
                        help="results root: runs in <output>/images, tables in <output>/tables (default: results)")
    parser.add_argument("--data-root", default=None, help="folder with the data sets (not needed at the cpu scale)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 per process is fastest here)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=_table2)

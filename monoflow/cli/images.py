"""``monoflow images train|evaluate|sample|presets``: the Table 2 experiments from the command line.

Examples::

    monoflow images presets
    monoflow images train --preset digits --model monotone          # CPU, minutes
    monoflow images train --preset cifar10 --data-root ~/data         # rerun the same line to resume
    torchrun --nproc_per_node=4 -m monoflow images train --preset cifar10 --data-root ~/data
    monoflow images evaluate --preset digits --model monotone --draws 5
    monoflow images sample --preset digits --model monotone --n 64

One GPU instead of the paper's four: keep the global batch and accumulate, e.g.
``--accumulation-steps 4 --set batch_size=16``; ``--set`` changes any field of the preset's
model or training configuration (``--set blocks=4,4,4 --set growth=64 --set lr=5e-4``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["register"]


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="preset name (see 'monoflow images presets')")
    p.add_argument("--model", default=None,
                   help="monotone | idensenet | resflow | residual-cpila | monotone-clipswish (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", type=Path, default=Path("results"),
                   help="results root (default: results); runs go to OUTPUT/images/<preset>/<model>/seed<k>")
    p.add_argument("--results-dir", default=None, help=argparse.SUPPRESS)  # deprecated: the images folder itself
    p.add_argument("--data-root", default=None, help="folder with the data set (not needed for digits and mnist5k)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N test images only")


def _images_dir(args: argparse.Namespace) -> Path:
    """Where the runs go: OUTPUT/images, or the deprecated ``--results-dir`` as given."""
    if args.results_dir is not None:
        import sys

        print("monoflow images: --results-dir DIR is deprecated; use -o/--output ROOT (runs go to ROOT/images)",
              file=sys.stderr)
        return Path(args.results_dir)
    return Path(args.output) / "images"


def parse_image_overrides(assignments) -> tuple:
    """``--set KEY=VALUE`` strings -> (model overrides, training overrides), by the field's owner.

    Values are Python literals (``blocks=4,4,4``, ``lr=5e-4``, ``fc_end=False``); anything else is
    a string. An unknown key is an error that lists the valid ones.
    """
    import ast

    from monoflow.models.image import ImageFlowConfig, ImageTrainingConfig

    model_fields, training_fields = ImageFlowConfig.__dataclass_fields__, ImageTrainingConfig.__dataclass_fields__
    model, training = {}, {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {assignment!r}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        if isinstance(value, list):
            value = tuple(value)
        if key in model_fields:
            model[key] = value
        elif key in training_fields:
            training[key] = value
        else:
            raise ValueError(f"--set {key}: no such field; model fields: {', '.join(sorted(model_fields))}; "
                             f"training fields: {', '.join(sorted(training_fields))}")
    return model, training


def _threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _train(args: argparse.Namespace) -> int:
    from monoflow.images.training import train_image_flow

    _threads(args)
    model_overrides, overrides = parse_image_overrides(args.overrides)
    for option, field in (("batch_size", "batch_size"), ("lr", "lr"), ("draws", "n_eval_draws"),
                          ("eval_every", "eval_every"), ("accumulation_steps", "accumulation_steps"),
                          ("epochs", "epochs"), ("concat_start", "start_learnable_concat_epoch")):
        if getattr(args, option) is not None:
            overrides[field] = getattr(args, option)
    from monoflow.images.distributed import close_distributed

    try:
        result = train_image_flow(
            args.preset, model=args.model, data_root=args.data_root, results_dir=str(_images_dir(args)), seed=args.seed,
            iterations=args.iterations, device=args.device, allow_tf32=args.allow_tf32,
            progress=not args.no_progress, training_overrides=overrides, eval_limit=args.eval_limit,
            model_overrides=model_overrides or None, stop_after=args.stop_after,
        )
    finally:
        close_distributed()
    if result.get("preempted"):
        return 0
    metrics = result.get("metrics", {})
    shown = {k: metrics[k] for k in ("bpd_test", "bpd_std", "accuracy", "train_surrogate_bpd_last") if k in metrics}
    print(json.dumps({"preset": result["preset"], "model": result["model"], "iterations": result["iterations"],
                      "params": result["params"], **shown}, indent=2))
    return 0


def _run_dir(args: argparse.Namespace) -> Path:
    from monoflow.images.results import run_directory
    from monoflow.models.image import get_image_preset

    preset = get_image_preset(args.preset)
    config = preset.model if args.model is None else preset.model.with_model(args.model)
    return run_directory(_images_dir(args), preset.name, config.model_name, args.seed)


def _evaluate(args: argparse.Namespace) -> int:
    from monoflow.data.images import load_image_dataset
    from monoflow.images.distributed import init_distributed
    from monoflow.images.evaluation import evaluate_accuracy, evaluate_bpd
    from monoflow.images.results import provenance, write_json
    from monoflow.images.training import apply_precision_policy, load_ema_model
    from monoflow.models.image import get_image_preset

    _threads(args)
    ctx = init_distributed(args.device)
    policy = apply_precision_policy(args.allow_tf32)
    run_dir = _run_dir(args)
    model = load_ema_model(run_dir, ctx.device)
    preset = get_image_preset(args.preset)
    test = load_image_dataset(preset.dataset, args.data_root, train=False)
    if model.config.task == "density":
        result = evaluate_bpd(model, test, ctx, batch_size=args.batch_size, n_draws=args.draws,
                              seed=args.eval_seed, limit=args.eval_limit)
    else:
        result = evaluate_accuracy(model, test, ctx, batch_size=args.batch_size, limit=args.eval_limit)
    result.update({"preset": preset.name, "model": model.config.model_name, "precision": policy,
                   "provenance": provenance(ctx.device, ctx.world_size), "eval_seed": args.eval_seed})
    if ctx.is_main:
        write_json(result, run_dir / "evaluation.json")
        print(json.dumps({k: v for k, v in result.items() if k not in ("provenance", "solver")}, indent=2))
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from monoflow.images.sampling import save_image_grid
    from monoflow.images.training import load_ema_model

    _threads(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = _run_dir(args)
    model = load_ema_model(run_dir, device)
    if model.config.task != "density":
        raise ValueError("sampling needs a density model, not a classifier")
    gen = torch.Generator().manual_seed(args.sample_seed)
    images = model.sample(args.n, generator=gen, temperature=args.temperature)
    out = Path(args.out) if args.out else run_dir / f"samples_T{args.temperature:g}_seed{args.sample_seed}.png"
    save_image_grid(images, out)
    print(out)
    return 0


def _certify(args: argparse.Namespace) -> int:
    from monoflow.images.training import recertify_run

    record = recertify_run(_run_dir(args))
    metrics = record["metrics"]
    print(json.dumps({k: metrics[k] for k in ("lipschitz_bound_max", "lipschitz_all_below_one")}, indent=2))
    return 0


def _presets(args: argparse.Namespace) -> int:
    from monoflow.models.image import count_parameters, get_image_preset, image_flow, list_image_presets

    for name in list_image_presets():
        p = get_image_preset(name)
        m = p.model
        line = (f"{name:34s} {p.dataset:10s} {m.model_name:18s} blocks={'-'.join(map(str, m.blocks)):9s} "
                f"growth={m.growth:<4d} {m.task:14s} paper_bpd={p.paper_bpd} paper_params={p.paper_params}")
        if args.params:
            line += f" params={count_parameters(image_flow(name))}"
        print(line)
    return 0


def register(subparsers) -> None:
    """Add ``monoflow images ...`` to the top-level parser."""
    images = subparsers.add_parser("images", help="image flows of Table 2: train, evaluate, sample, presets",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = images.add_subparsers(dest="images_command", metavar="ACTION")
    images.set_defaults(handler=lambda args: images.print_help() or 2)

    train = sub.add_parser("train", help="train (or resume) a preset; writes run.json, samples.png, checkpoints")
    _add_run_arguments(train)
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="change one field of the preset's model or training config (repeatable), "
                       "e.g. --set blocks=4,4,4 --set growth=64 --set warmup_iterations=250")
    train.add_argument("--iterations", type=int, default=None, help="optimiser steps (default: the preset's epochs)")
    train.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's; --iterations wins)")
    train.add_argument("--accumulation-steps", type=int, default=None,
                       help="micro-batches per optimiser step: one GPU reaches the paper's global batch "
                       "with --accumulation-steps 4 --set batch_size=16 (the batch is per micro-batch)")
    train.add_argument("--concat-start", type=int, default=None, metavar="EPOCH",
                       help="epoch from which the learnable concatenation trains (default: the preset's)")
    train.add_argument("--batch-size", type=int, default=None, help="global batch size (default: the preset's)")
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--draws", type=int, default=None, help="estimator draws of the final evaluation")
    train.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (0: only at the end)")
    train.add_argument("--allow-tf32", action="store_true", help="opt in to TF32 (off: full float32 solves)")
    train.add_argument("--stop-after", type=int, default=None, metavar="N",
                       help="stop with a checkpoint after this many optimiser steps in total (rerun to resume)")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(handler=_train)

    evaluate = sub.add_parser("evaluate", help="test bpd (EMA weights) with its spread over estimator draws")
    _add_run_arguments(evaluate)
    evaluate.add_argument("--draws", type=int, default=5)
    evaluate.add_argument("--batch-size", type=int, default=200)
    evaluate.add_argument("--eval-seed", type=int, default=1)
    evaluate.add_argument("--allow-tf32", action="store_true")
    evaluate.set_defaults(handler=_evaluate)

    sample = sub.add_parser("sample", help="a grid of samples from a trained run")
    _add_run_arguments(sample)
    sample.add_argument("--n", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--sample-seed", type=int, default=0)
    sample.add_argument("--out", default=None, help="PNG path (default: in the run folder)")
    sample.set_defaults(handler=_sample)

    certify = sub.add_parser("certify", help="recompute a finished run's Lipschitz certificates into its run.json")
    _add_run_arguments(certify)
    certify.set_defaults(handler=_certify)

    presets = sub.add_parser("presets", help="list the presets")
    presets.add_argument("--params", action="store_true", help="also build each model and count its parameters")
    presets.set_defaults(handler=_presets)

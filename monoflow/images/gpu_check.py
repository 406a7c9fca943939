r"""What a Table 2 row costs on one GPU, measured in under ten minutes (``benchmarks/gpu_check.sh``).

Three parts, each written to the JSON report as soon as it is measured (a timeout keeps what
finished):

1. ``throughput``: CIFAR-10, Monotone Flow against i-DenseNet, a short real training run each
   (:func:`~monoflow.images.benchmark.measure_training`) with a bounded evaluation;
2. ``presets``: one training step of every paper preset (MNIST, CIFAR-10, ImageNet32,
   ImageNet64, CIFAR-10 with variational dequantisation) at the paper's per-GPU batch: seconds
   per micro-batch, peak memory, whether it fits an 80 GB GPU, and from these the time of an
   optimiser step, an epoch and the paper's whole budget (1000 epochs) on this one GPU and,
   with ideal scaling, on the paper's number of GPUs;
3. ``step_cost``: the FLOPs of one training step of a preset split into the forward solve, the
   log-det estimator and the backward pass, in evaluations of g per block, and the achieved
   FLOP/s against a measured matrix-multiply throughput of the device
   (:func:`~monoflow.images.benchmark.step_cost`).

Each measurement runs in a fresh process with a time limit, so peak memory is that model's own
and an out-of-memory error or a hang is recorded, not fatal. ``--cpu-smoke`` shrinks every model
so that the whole check passes on a laptop CPU in a few minutes.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

__all__ = ["PAPER_RUNS", "run_check", "main"]

#: preset -> (GPUs the paper trained on, per-GPU micro-batch, training images). The paper gives
#: the global batch and the GPUs of CIFAR-10 (4) and ImageNet32 (8); ImageNet64 is assumed to use
#: 8 like ImageNet32, MNIST one GPU with 4 accumulation steps (its preset).
PAPER_RUNS: Dict[str, tuple] = {
    "mnist": (1, 64, 60_000),
    "cifar10": (4, 16, 50_000),
    "imagenet32": (8, 32, 1_281_167),
    "imagenet64": (8, 32, 1_281_167),
    "cifar10-vardeq": (4, 16, 50_000),
}

GPU_MEMORY_GB = 80.0

#: the shrunken models of --cpu-smoke (every preset keeps its layout and data shape)
SMOKE_OVERRIDES = {"blocks": None, "growth": 8, "fc_blocks": 1, "fc_first": 8, "fc_growth": 8, "vardeq_hidden": 16,
                   "vardeq_blocks": 1, "vardeq_cond_channels": 16}


def _smoke_overrides(preset: str) -> dict:
    from monoflow.models.image import get_image_preset

    n_scales = len(get_image_preset(preset).model.blocks)
    return {**SMOKE_OVERRIDES, "blocks": (1,) * n_scales}


def _call(target: Callable, kwargs: dict, queue) -> None:
    try:
        queue.put(("ok", target(**kwargs)))
    except Exception as error:  # reported to the parent
        queue.put(("error", f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"))


def run_isolated(target: Callable, kwargs: dict, timeout_s: float) -> Dict[str, Any]:
    """``target(**kwargs)`` in a fresh spawned process; ``{"error": ...}`` on failure or timeout."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_call, args=(target, kwargs, queue))
    process.start()
    try:
        status, payload = queue.get(timeout=timeout_s)
    except Exception:  # queue.Empty: the time limit
        process.terminate()
        process.join(5)
        return {"error": f"timed out after {timeout_s:.0f} s"}
    process.join(30)
    return payload if status == "ok" else {"error": payload}


def _budget(preset: str, step: Dict[str, Any]) -> Dict[str, Any]:
    """An optimiser step, an epoch and the whole budget on this GPU from one micro-batch's time."""
    from monoflow.models.image import get_image_preset

    gpus, per_gpu, n_train = PAPER_RUNS[preset]
    training = get_image_preset(preset).training
    images_per_step = training.batch_size * training.accumulation_steps
    seconds = step.get("seconds_per_micro_batch")  # one micro-batch of per_gpu images
    out: Dict[str, Any] = {"paper_gpus": gpus, "per_gpu_batch": per_gpu, "global_batch": images_per_step,
                           "train_images": n_train, "epochs": training.epochs}
    if seconds:
        one_gpu_step = seconds * images_per_step / per_gpu
        epoch_h = one_gpu_step * (n_train // images_per_step) / 3600
        out.update({"one_gpu_optimiser_step_s": one_gpu_step, "one_gpu_epoch_hours": epoch_h,
                    "one_gpu_budget_days": epoch_h * training.epochs / 24,
                    "paper_gpus_budget_days_ideal": epoch_h * training.epochs / 24 / gpus})
    peak = step.get("peak_memory_mb")
    if peak is not None:
        out["fits_80gb"] = peak / 1024 < GPU_MEMORY_GB
    elif "out of memory" in str(step.get("error", "")).lower():
        out["fits_80gb"] = False
    return out


def run_check(out: Path, *, device: str, smoke: bool, deadline_s: float = 570.0,
              presets: Sequence[str] = tuple(PAPER_RUNS), log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Measure everything in turn, rewriting ``out`` after each measurement; returns the report."""
    from monoflow.images.benchmark import measure_training, step_cost
    from monoflow.provenance import provenance

    start = time.time()
    report: Dict[str, Any] = {"device": device, "cpu_smoke": smoke, "provenance": provenance(device),
                              "gpu_memory_assumed_gb": GPU_MEMORY_GB, "throughput": [], "presets": {},
                              "step_cost": None, "finished": False}

    def left() -> float:
        return deadline_s - (time.time() - start)

    def save() -> None:
        report["elapsed_s"] = time.time() - start
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))

    save()
    # 1. CIFAR-10 throughput, Monotone Flow vs i-DenseNet (bounded training and evaluation)
    for model in ("monotone", "idensenet"):
        kwargs = dict(preset="cifar10", model=model, device=device, warmup_steps=2, threads=None)
        kwargs.update(dict(steps=3, batch_size=2, eval_images=4, eval_draws=1, model_overrides=_smoke_overrides("cifar10"))
                      if smoke else dict(steps=300, time_budget=min(100.0, left() / 6), eval_images=200, eval_draws=1))
        result = run_isolated(measure_training, kwargs, timeout_s=max(30.0, min(200.0, left() - 60)))
        report["throughput"].append({"model": model, **result})
        log(f"throughput {model}: {result.get('images_per_s', result.get('error'))}")
        save()
    # 2. one step of every paper preset at its per-GPU batch
    for preset in presets:
        if left() < 40:
            report["presets"][preset] = {"error": "skipped: the check's time budget is spent"}
            continue
        gpus, per_gpu, _ = PAPER_RUNS[preset]
        kwargs = dict(preset=preset, model=None, device=device, steps=3, warmup_steps=1, eval_images=0,
                      batch_size=2 if smoke else per_gpu, model_overrides=_smoke_overrides(preset) if smoke else None)
        result = run_isolated(measure_training, kwargs, timeout_s=min(150.0, left() - 20))
        report["presets"][preset] = {**result, **_budget(preset, result)}
        log(f"{preset}: {result.get('seconds_per_micro_batch', result.get('error'))} s per micro-batch, "
            f"{result.get('peak_memory_mb')} MB")
        save()
    # 3. where one CIFAR-10 step's arithmetic goes
    if left() > 30:
        kwargs = dict(preset="cifar10", model="monotone", device=device, batch_size=2 if smoke else 16,
                      model_overrides=_smoke_overrides("cifar10") if smoke else None)
        report["step_cost"] = run_isolated(step_cost, kwargs, timeout_s=min(120.0, left() - 10))
        save()
    report["finished"] = True
    save()
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="shrink every model and run on the CPU")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--deadline", type=float, default=570.0, help="seconds for the whole check (default 570)")
    parser.add_argument("--presets", nargs="+", choices=list(PAPER_RUNS), default=list(PAPER_RUNS),
                        help="paper presets whose training step is measured (default: all five)")
    args = parser.parse_args(argv)
    import torch

    if args.cpu_smoke:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
        print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
    else:
        parser.exit(2, "gpu_check: no CUDA device; use --cpu-smoke for the CPU check\n")
    default = "gpu_check_cpu_smoke.json" if args.cpu_smoke else "gpu_check.json"
    out = args.out or Path("results/images/benchmarks") / default
    report = run_check(out, device=device, smoke=args.cpu_smoke, deadline_s=args.deadline, presets=args.presets)
    print(f"wrote {out} ({report['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

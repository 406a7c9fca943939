r"""Throughput, peak memory and solver work of image-flow training, monotone against residual blocks.

Each measurement is a short run of :func:`~monoflow.images.training.train_image_flow` (the real
training step: Russian-roulette log-dets with the Neumann gradient, memory-efficient mode,
implicit gradients, power iterations, EMA) in a fresh process, so peak memory is that model's
alone. It reports seconds per step and images per second (first ``warmup_steps`` excluded),
peak memory (CUDA: ``max_memory_allocated``; CPU: peak resident set of the process), network
evaluations per block per step of the forward solve and of the adjoint (gradient) solve (the
released code's adjoint ran 100+ per block per step), and a short evaluation.

Without ``--data-root`` the images are random (seeded) uint8 arrays of the preset's shape: timing
and memory do not depend on pixel values, but the bpd of such data means nothing (flagged
``"data": "synthetic"``). Command line::

    python -m monoflow.images.benchmark --preset cifar10 --models monotone idensenet \
        --steps 200 --time-budget 200 --eval-images 1000 --out gpu_check.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from monoflow.flop_count import blocks_and_inputs, count_flops, g_flops_of_blocks, matmul_flops_per_second
from monoflow.flop_count import synchronize as _synchronize
from monoflow.provenance import provenance

__all__ = ["measure_training", "compare_models", "step_cost", "matmul_flops_per_second", "main"]


def _synthetic(shape, n_levels: int, n: int, seed: int):
    from monoflow.data.images import ImageArray

    rng = np.random.default_rng(seed)
    return ImageArray(rng.integers(0, n_levels, size=(n,) + tuple(shape), dtype=np.uint8),
                      rng.integers(0, 10, size=n), n_levels, "synthetic")


def measure_training(preset: str, model: Optional[str], *, steps: int, batch_size: Optional[int] = None,
                     device: Optional[str] = None, data_root: Optional[str] = None,
                     model_overrides: Optional[dict] = None, eval_images: int = 200, eval_draws: int = 2,
                     time_budget: Optional[float] = None, warmup_steps: int = 3, threads: Optional[int] = None,
                     seed: int = 0) -> Dict[str, Any]:
    """Train ``steps`` steps of ``preset`` with ``model`` (None: the preset's) in this process and
    report the costs. Seconds per step are medians over the steps after ``warmup_steps`` and count
    every micro-batch of gradient accumulation; ``eval_images=0`` skips the evaluation."""
    import torch

    from monoflow.data.images import BUNDLED_DATASETS, load_image_dataset
    from monoflow.images.results import seconds_per_step
    from monoflow.images.training import train_image_flow
    from monoflow.models.image import get_image_preset

    if threads:
        torch.set_num_threads(threads)
    spec = get_image_preset(preset)
    config = spec.model if model is None else spec.model.with_model(model)
    if model_overrides:
        from dataclasses import replace

        config = replace(config, **model_overrides)
    batch = batch_size or spec.training.batch_size
    if data_root or spec.dataset in BUNDLED_DATASETS:
        train = load_image_dataset(spec.dataset, data_root, train=True)
        test = load_image_dataset(spec.dataset, data_root, train=False)
        data = spec.dataset
    else:
        train = _synthetic(config.image_shape, config.n_levels, max(batch * 4, 256), seed)
        test = _synthetic(config.image_shape, config.n_levels, max(eval_images, 1), seed + 1)
        data = "synthetic"
    if torch.cuda.is_available() and device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        record = train_image_flow(
            preset, model=model, run_dir=tmp, iterations=steps, device=device, progress=False, seed=seed,
            model_overrides=model_overrides,
            training_overrides=dict(batch_size=batch, log_every=1, checkpoint_every=10**9, eval_every=0,
                                    n_eval_draws=eval_draws, n_samples=0, eval_batch_size=min(200, max(eval_images, 1))),
            train_data=train, test_data=test, eval_limit=eval_images, max_seconds=time_budget,
            final_evaluation=eval_images > 0,
        )
    log = record["train_log"]
    timed = log[warmup_steps:] if len(log) > warmup_steps else log
    ips = [e["images_per_s"] for e in timed]
    metrics = record.get("metrics", {})
    accumulation = record["training_config"]["accumulation_steps"]
    step_seconds = seconds_per_step(record, warmup_entries=len(log) - len(timed))
    return {
        "preset": preset, "model": config.model_name, "data": data, "device": record["provenance"]["device"],
        "gpu": record["provenance"].get("gpu"), "params": record["params"], "batch_size": batch,
        "steps": record["iterations"], "stopped_by_time_budget": record["stopped_by_time_budget"],
        "train_seconds": record["wall_time_s"],
        "images_per_s": statistics.median(ips) if ips else None,
        "accumulation_steps": accumulation,
        "seconds_per_step": step_seconds,
        "seconds_per_micro_batch": step_seconds / accumulation if step_seconds else None,
        "peak_memory_mb": record["peak_memory_mb"],
        "process_memory_before_training_mb": base_rss,
        "forward_evaluations_per_block": _mean(timed, "solver_forward_evaluations"),
        "inverse_evaluations_per_block": _mean(timed, "solver_inverse_evaluations"),
        "adjoint_evaluations_per_block": _mean(timed, "solver_adjoint_evaluations"),
        "adjoint_evaluations_max_over_steps": _max(timed, "solver_adjoint_evaluations"),
        "train_surrogate_bpd_first": log[0]["train_surrogate_bpd"] if log else None,
        "train_surrogate_bpd_last": log[-1]["train_surrogate_bpd"] if log else None,
        "eval_bpd": metrics.get("bpd_test"), "eval_bpd_std": metrics.get("bpd_std"),
        "eval_images": metrics.get("n_test_images"), "eval_seconds": record.get("evaluation_seconds"),
        "precision": record["precision"], "torch_version": record["provenance"]["torch_version"],
    }


def _step_cost_inputs(preset: str, model: Optional[str], device: Optional[str], batch_size: int,
                      model_overrides: Optional[dict], seed: int):
    """``(config, device, flow, k, noise, x)``: the seeded model of :func:`step_cost` and one batch of
    random integer images k, their dequantisation noise and the dequantised images x."""
    from dataclasses import replace

    import torch

    from monoflow.models.image import ImageFlow, get_image_preset

    spec = get_image_preset(preset)
    config = spec.model if model is None else spec.model.with_model(model)
    config = replace(config, **(model_overrides or {}))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    flow = ImageFlow(config).to(dev)
    k = torch.randint(0, config.n_levels, (batch_size, *config.image_shape), device=dev)
    noise = torch.rand(k.shape, device=dev)
    x = (k.float() + noise) / config.n_levels
    return config, dev, flow, k, noise, x


def _timed(fn, device):
    """``(seconds, fn())``, synchronised; without the counting mode, whose Python dispatch would
    dominate the time."""
    _synchronize(device)
    start = time.perf_counter()
    result = fn()
    _synchronize(device)
    return time.perf_counter() - start, result


def step_cost(preset: str, model: Optional[str] = None, *, device: Optional[str] = None, batch_size: int = 16,
              model_overrides: Optional[dict] = None, seed: int = 0) -> Dict[str, Any]:
    r"""Where one training step's arithmetic goes, counted by ``torch.utils.flop_counter``.

    FLOPs of matrix products and convolutions (elementwise work is not counted) of one
    evaluation of every block's g, of the forward solves (no-grad forward), of the forward with
    the log-det estimator (training mode), and of the backward pass. Each phase is also given in
    *evaluations of g per block*: its FLOPs over those of one evaluation of every g. With the
    step's measured time and the device's matrix-multiply throughput this gives the fraction of
    the arithmetic limit the step reaches.
    """
    import torch

    from monoflow.lipschitz import update_lipschitz

    config, dev, flow, k, noise, x = _step_cost_inputs(preset, model, device, batch_size, model_overrides, seed)
    blocks, inputs = blocks_and_inputs(flow, x)
    flow.train()

    def solve_only():
        with torch.no_grad():
            flow(x, with_logdet=False)

    def loss():
        return flow.bits_per_dim(k, noise=noise).mean()

    g_flops = g_flops_of_blocks(blocks, inputs)
    solve_flops, _ = count_flops(solve_only)
    forward_flops, value = count_flops(loss)
    backward_flops, _ = count_flops(value.backward)
    solve_s, _ = _timed(solve_only, dev)
    forward_s, value = _timed(loss, dev)
    backward_s, _ = _timed(value.backward, dev)
    power_s, _ = _timed(lambda: update_lipschitz(flow, tol=1e-3, max_iterations=200), dev)
    step_flops = forward_flops + backward_flops
    step_s = forward_s + backward_s + power_s
    peak = matmul_flops_per_second(dev)
    per_block = max(g_flops, 1)
    return {
        "preset": preset, "model": config.model_name, "batch_size": batch_size, "device": str(dev),
        "blocks": len(blocks), "g_flops_all_blocks": g_flops,
        "g_evaluations_per_block": {"forward_solve": solve_flops / per_block,
                                    "logdet_estimator": (forward_flops - solve_flops) / per_block,
                                    "backward": backward_flops / per_block},
        "step_flops": step_flops,
        "seconds": {"forward_solve_alone": solve_s, "forward_with_logdet": forward_s, "backward": backward_s,
                    "power_iterations": power_s, "step": step_s},
        "achieved_flops_per_s": step_flops / step_s, "matmul_flops_per_s": peak,
        "fraction_of_matmul_throughput": step_flops / step_s / peak,
        "note": "FLOPs of matrix products and convolutions only, counted in one step; times of a second step",
    }


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _mean(entries: List[dict], key: str) -> Optional[float]:
    values = [e[key] for e in entries if key in e]
    return float(np.mean(values)) if values else None


def _max(entries: List[dict], key: str) -> Optional[float]:
    values = [e[key] for e in entries if key in e]
    return float(np.max(values)) if values else None


def _worker(kwargs: dict, queue) -> None:
    try:
        queue.put(("ok", measure_training(**kwargs)))
    except Exception as error:  # reported to the parent, which raises
        import traceback

        queue.put(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


def compare_models(preset: str, models: Sequence[str], **kwargs) -> List[Dict[str, Any]]:
    """:func:`measure_training` for each model, each in a fresh (spawned) process."""
    ctx = mp.get_context("spawn")
    results = []
    for model in models:
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=({"preset": preset, "model": model, **kwargs}, queue))
        proc.start()
        status, payload = queue.get()
        proc.join()
        if status != "ok":
            raise RuntimeError(f"benchmark of {preset}/{model} failed:\n{payload}")
        results.append(payload)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--models", nargs="+", default=["monotone", "idensenet"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--eval-draws", type=int, default=2)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds of training per model")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--override", action="append", default=[],
                        help="model config field=value (python literal), e.g. blocks=(1,1,1)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import ast

    overrides = {}
    for item in args.override:
        key, _, value = item.partition("=")
        overrides[key] = ast.literal_eval(value)
    start = time.time()
    results = compare_models(
        args.preset, args.models, steps=args.steps, batch_size=args.batch_size, device=args.device,
        data_root=args.data_root, model_overrides=overrides or None, eval_images=args.eval_images,
        eval_draws=args.eval_draws, time_budget=args.time_budget, threads=args.threads,
    )
    report = {"preset": args.preset, "model_overrides": {k: repr(v) for k, v in overrides.items()},
              "results": results, "total_seconds": time.time() - start,
              "provenance": provenance(args.device or "cpu")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for r in results:
        print(f"{r['model']:12s} {r['images_per_s'] or float('nan'):9.1f} img/s  {r['peak_memory_mb']:9.0f} MB  "
              f"forward {r['forward_evaluations_per_block']} adjoint {r['adjoint_evaluations_per_block']} evals/block  "
              f"eval bpd {r['eval_bpd']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

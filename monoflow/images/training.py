r"""Training loop of the image flows: one function from a preset name to a finished ``run.json``.

What one optimiser step does (SPEC.md section 4):

1. ``accumulation_steps`` micro-batches of the global batch; each rank takes its slice. Random
   flips / crops and the uniform dequantisation noise come from a generator seeded by
   (seed, micro-batch), drawn for the whole global batch, so N ranks see exactly what one process
   sees.
2. Loss: the mean training-surrogate bpd (Neumann-gradient log-dets: its gradient is unbiased,
   its value is *not* a bpd) or the cross-entropy for classification; backward.
3. Gradients averaged over ranks, clipped to norm ``grad_clip``; Adam with linear warm-up.
4. Power iterations of every spectral norm to tolerance 1e-3 (at most 200); EMA update.

Checkpoints every ``checkpoint_every`` steps and on SIGTERM/SIGINT (so a preempted job stops
cleanly); rerunning the same command resumes from them. Evaluation uses the EMA weights with
converged power iterations and the unbiased estimator (:mod:`monoflow.images.evaluation`).

Precision policy: float32 throughout; TF32 matmuls and convolutions are switched *off* (as the
paper's code did: the fixed-point solves and the log-det series need full float32) unless the
caller passes ``allow_tf32=True``; the policy in force is written to ``run.json``.
"""
from __future__ import annotations

import copy
import json
import resource
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from monoflow.blocks import solver_stats
from monoflow.data.images import ImageArray, batches_per_epoch, load_image_dataset
from monoflow.lipschitz import certify_lipschitz, set_learnable_concat, update_lipschitz
from monoflow.models.image import ImageFlow, ImagePreset, count_parameters, get_image_preset
from monoflow.checkpoint import FolderLock, capture_rng_state, restore_rng_state, save_checkpoint, stop_on_signals
from monoflow.images.checkpoint import (check_same_run, checkpoint_path, load_checkpoint, load_rng_state, read_record,
                                       rng_path)
from monoflow.images.distributed import (DistributedContext, all_reduce_sum, average_gradients, barrier,
                                         broadcast_module, init_distributed)
from monoflow.images.ema import ExponentialMovingAverage
from monoflow.images.evaluation import batch_seed, evaluate_accuracy, evaluate_bpd, prepare_for_evaluation
from monoflow.images.results import provenance, run_directory, write_json
from monoflow.images.sampling import save_image_grid

__all__ = ["apply_precision_policy", "train_image_flow", "build_run", "peak_memory_mb", "augment_batch",
           "load_ema_model", "recertify_run", "certificate_summary"]


def apply_precision_policy(allow_tf32: bool = False) -> Dict[str, Any]:
    """Float32 everywhere; TF32 off unless ``allow_tf32`` (returns the policy for the record)."""
    if torch.get_default_dtype() != torch.float32:
        raise RuntimeError(f"image training runs in float32; the default dtype is {torch.get_default_dtype()}")
    torch.backends.cuda.matmul.allow_tf32 = bool(allow_tf32)
    torch.backends.cudnn.allow_tf32 = bool(allow_tf32)
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
    return {"dtype": "float32", "tf32": bool(allow_tf32)}


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch (CUDA) or peak resident memory of the process (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def augment_batch(k: torch.Tensor, generator: torch.Generator, flip: bool, crop_padding: int) -> torch.Tensor:
    """Random horizontal flips and random crops (reflect padding) of a uint8 batch (B, C, H, W)."""
    b, c, h, w = k.shape
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        k = torch.where(mask.view(b, 1, 1, 1), k.flip(3), k)
    if crop_padding > 0:
        p = crop_padding
        padded = F.pad(k.float(), (p, p, p, p), mode="reflect")
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        k = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)]).to(k.dtype)
    return k


class _Preempted(Exception):
    pass


def build_run(preset: ImagePreset, model: Optional[str], model_overrides: Optional[dict],
              training_overrides: Optional[dict]):
    """The (model config, training config, model name) of a run."""
    config = preset.model if model is None else preset.model.with_model(model)
    if model_overrides:
        config = replace(config, **model_overrides)
    training = replace(preset.training, **(training_overrides or {}))
    return config, training, config.model_name


def _check_training_config(training: Any) -> None:
    """Refuse settings that would train on something else than asked (or not at all)."""
    for key in ("batch_size", "accumulation_steps", "checkpoint_every", "log_every"):
        if int(getattr(training, key)) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(training, key)}")
    if not training.lr > 0:
        raise ValueError(f"lr must be positive, got {training.lr}")
    if training.iterations is not None and training.iterations <= 0:
        raise ValueError(f"iterations must be a positive number of optimiser steps, got {training.iterations}")


def load_ema_model(run_dir: Path, device: torch.device, state: Optional[Dict[str, Any]] = None) -> ImageFlow:
    """The EMA model of a run's checkpoint (power iterations converged, eval mode); ``state``: the
    checkpoint already loaded (on the CPU or ``device``), to read it only once."""
    if state is None:
        state = load_checkpoint(run_dir, map_location=device)
    if state is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}; train first (monoflow images train ...)")
    from monoflow.models.image import ImageFlowConfig

    config = ImageFlowConfig(**{**state["model_config"], "image_shape": tuple(state["model_config"]["image_shape"]),
                                "blocks": tuple(state["model_config"]["blocks"])})
    model = ImageFlow(config).to(device)
    model.load_state_dict(state["model"])
    set_learnable_concat(model, state.get("learnable_concat", False))
    ema = ExponentialMovingAverage(model, state["ema"]["decay"])
    ema.load_state_dict(state["ema"])
    ema.copy_to(model)
    prepare_for_evaluation(model)
    return model.eval()


def certificate_summary(model: torch.nn.Module) -> Dict[str, Any]:
    """``lipschitz_bound_max`` and ``lipschitz_all_below_one`` of a model's certificates
    (:func:`~monoflow.lipschitz.certify_lipschitz`); empty if no network can be certified."""
    certificates = certify_lipschitz(model)
    if not certificates:
        return {}
    return {"lipschitz_bound_max": max(c.bound for c in certificates),
            "lipschitz_all_below_one": all(c.holds for c in certificates)}


def recertify_run(run_dir: Path) -> Dict[str, Any]:
    """Recompute the Lipschitz certificates of a finished run's EMA model from its checkpoint and
    write them into its ``run.json`` (``metrics.lipschitz_bound_max``, ``lipschitz_all_below_one``,
    ``lipschitz_certified_by``: the code version and time), e.g. after the certificate got tighter.
    Returns the updated record."""
    from monoflow.provenance import provenance as base_provenance

    run_dir = Path(run_dir)
    record = read_record(run_dir / "run.json")
    state = load_checkpoint(run_dir, map_location="cpu")
    if state is None or state["step"] != record.get("iterations"):
        found = "no checkpoint" if state is None else f"a checkpoint at step {state['step']}"
        raise ValueError(f"{run_dir}: run.json records {record.get('iterations')} steps but there is {found}; "
                         "certify a run only from the checkpoint its record was made from")
    summary = certificate_summary(load_ema_model(run_dir, torch.device("cpu"), state))
    if not summary:
        raise ValueError(f"{run_dir}: the model has no network whose Lipschitz constant can be certified")
    origin = base_provenance(torch.device("cpu"))
    record.setdefault("metrics", {}).update({
        **summary,
        "lipschitz_certified_by": {k: origin.get(k) for k in ("git_commit", "monoflow_version", "created")
                                   if k in origin},
    })
    write_json(record, run_dir / "run.json")
    return record


def train_image_flow(
    preset: str,
    *,
    model: Optional[str] = None,
    data_root: Optional[str] = None,
    results_dir: str = "results/images",
    seed: int = 0,
    iterations: Optional[int] = None,
    device: Optional[str] = None,
    allow_tf32: bool = False,
    progress: bool = True,
    model_overrides: Optional[dict] = None,
    training_overrides: Optional[dict] = None,
    train_data: Optional[ImageArray] = None,
    test_data: Optional[ImageArray] = None,
    eval_limit: int = 0,
    run_dir: Optional[str] = None,
    final_evaluation: bool = True,
    max_seconds: Optional[float] = None,
) -> Dict[str, Any]:
    """Train (or resume) the image flow of ``preset`` and write ``run.json``; returns its content.

    Args:
        preset: a name from :func:`~monoflow.models.image.list_image_presets`.
        model: swap the block/activation pair (``"monotone"``, ``"idensenet"``, ...).
        data_root: folder with the data set files (not needed for ``digits``).
        results_dir: the run goes to ``<results_dir>/<preset>/<model>/seed<seed>`` (or ``run_dir``).
        iterations: optimiser steps (default: the preset's epochs times the steps per epoch).
        device: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA if available).
        allow_tf32: opt in to TF32 (off by default; see the module docstring).
        model_overrides, training_overrides: fields of the preset's configs to replace.
        train_data, test_data: arrays to use instead of loading the preset's data set.
        eval_limit: evaluate on the first ``eval_limit`` test images only (0 = all).
        final_evaluation: evaluate and sample at the end (the benchmark turns it off).
        max_seconds: stop training after this many seconds of this call (a time budget; the
            record says ``stopped_by_time_budget``).
    """
    if iterations is not None and iterations <= 0:
        raise ValueError(f"iterations must be a positive number of optimiser steps, got {iterations}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    ctx = init_distributed(device)
    policy = apply_precision_policy(allow_tf32)
    spec = get_image_preset(preset)
    config, training, model_name = build_run(spec, model, model_overrides, training_overrides)
    _check_training_config(training)
    out = Path(run_dir) if run_dir else run_directory(results_dir, spec.name, model_name, seed)
    # released at the end (early returns: when collected; a killed process: by the system)
    folder_lock, lock_error = None, None
    if ctx.is_main:
        try:
            folder_lock = FolderLock(out)
        except OSError as error:  # a read-only folder is enough to reread a finished run
            if not (out / "run.json").is_file():
                raise
            lock_error = error
    barrier(ctx)

    if train_data is None:
        train_data = load_image_dataset(spec.dataset, data_root, train=True)
    if test_data is None:
        test_data = load_image_dataset(spec.dataset, data_root, train=False)
    if tuple(train_data.shape) != tuple(config.image_shape):
        raise ValueError(f"data images have shape {train_data.shape}, the model expects {config.image_shape}")
    if training.batch_size % ctx.world_size:
        raise ValueError(f"batch size {training.batch_size} is not divisible by the {ctx.world_size} ranks")
    local_batch = training.batch_size // ctx.world_size
    steps_per_epoch = max(1, batches_per_epoch(len(train_data), training.batch_size) // training.accumulation_steps)
    total_steps = iterations or training.iterations or training.epochs * steps_per_epoch
    learnable_concat_step = training.start_learnable_concat_epoch * steps_per_epoch
    density = config.task == "density"

    # Same initial weights on every rank (seeded), then rank 0's copy wins anyway.
    torch.manual_seed(seed)
    flow = ImageFlow(config).to(ctx.device)
    n_params = count_parameters(flow)
    first_idx = np.random.default_rng([seed, 0]).permutation(len(train_data))[:training.batch_size]
    k0, _ = train_data.batch(first_idx)
    u0 = torch.rand(k0.shape, generator=torch.Generator().manual_seed(batch_seed(seed, 6)))
    part0 = slice(ctx.rank * local_batch, (ctx.rank + 1) * local_batch)
    with torch.no_grad():  # data-dependent ActNorm initialisation (synchronised), lazy SN state
        x0 = (k0[part0].to(ctx.device).float() + u0[part0].to(ctx.device)) / config.n_levels
        flow(x0, with_logdet=False)
    broadcast_module(flow, ctx)
    torch.manual_seed(batch_seed(seed, 2, ctx.rank))
    np.random.seed(batch_seed(seed, 3, ctx.rank) % 2**32)

    optimizer = torch.optim.Adam(flow.parameters(), lr=training.lr, betas=tuple(training.betas),
                                 weight_decay=training.weight_decay)
    warmup = max(1, training.warmup_iterations)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ema = ExponentialMovingAverage(flow, training.ema_decay)
    step, log, evals, elapsed_before = 0, [], [], 0.0

    try:
        state = load_checkpoint(out, map_location=ctx.device)
        if state is not None:
            if state["preset"] != spec.name or state["model_name"] != model_name:
                raise ValueError(f"{out} holds a checkpoint of {state['preset']}/{state['model_name']}, "
                                 f"not {spec.name}/{model_name}")
            check_same_run(state, config, training, out)
    except ValueError:
        if folder_lock is not None:  # released now, not when collected: the caller may retry at once
            folder_lock.release()
        raise
    if state is not None:
        if state.get("finished") and state["step"] >= total_steps and (out / "run.json").exists():
            if ctx.is_main:
                print(f"{out} is complete ({state['step']} steps); delete run.json to evaluate again")
            return read_record(out / "run.json")
        flow.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema.load_state_dict(state["ema"])
        step, log, evals = state["step"], state["log"], state["evaluations"]
        elapsed_before = state.get("train_seconds", 0.0)
        rng_state = load_rng_state(out, ctx.rank)
        if rng_state is not None:
            restore_rng_state(rng_state)
        if ctx.is_main:
            print(f"resuming {out} at step {step}/{total_steps}")
    if lock_error is not None:
        raise lock_error

    def save(finished: bool) -> None:
        save_checkpoint(rng_path(out, ctx.rank), capture_rng_state())
        if ctx.is_main:
            save_checkpoint(checkpoint_path(out), {
                "preset": spec.name, "model_name": model_name, "model_config": asdict(config),
                "training_config": asdict(training), "model": flow.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "log": log, "evaluations": evals, "finished": finished, "total_steps": total_steps,
                "learnable_concat": step >= learnable_concat_step, "seed": seed, "world_size": ctx.world_size,
                "train_seconds": elapsed_before + (time.time() - loop_start),
            })
        barrier(ctx)


    def global_order(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(len(train_data))

    order_cache: Dict[int, np.ndarray] = {}
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=f"{spec.name}/{model_name}", dynamic_ncols=True)
    loop_start = time.time()
    window_start, window_images = time.time(), 0
    flow.train()
    stopped_by_budget = False
    with stop_on_signals() as stop:
        try:
            while step < total_steps:
                if max_seconds is not None and time.time() - loop_start > max_seconds:
                    stopped_by_budget = True
                    break
                set_learnable_concat(flow, step >= learnable_concat_step)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
                per_epoch = batches_per_epoch(len(train_data), training.batch_size)
                for a in range(training.accumulation_steps):
                    m = step * training.accumulation_steps + a
                    epoch, b = divmod(m, per_epoch)
                    if epoch not in order_cache:
                        order_cache.clear()
                        order_cache[epoch] = global_order(epoch)
                    idx = order_cache[epoch][b * training.batch_size:(b + 1) * training.batch_size]
                    k, y = train_data.batch(idx)
                    gen = torch.Generator().manual_seed(batch_seed(seed, 1, m))
                    k = augment_batch(k, gen, training.random_flip, training.random_crop_padding)
                    noise = torch.rand(k.shape, generator=gen)
                    part = slice(ctx.rank * local_batch, (ctx.rank + 1) * local_batch)
                    k, y, noise = k[part].to(ctx.device), y[part].to(ctx.device), noise[part].to(ctx.device)
                    if density and config.dequantization == "variational":
                        loss = flow.bits_per_dim(k).mean()  # the model draws its noise (per-rank RNG)
                    elif density:
                        loss = flow.bits_per_dim(k, noise=noise).mean()
                    else:
                        x = (k.float() + noise) / config.n_levels
                        loss = F.cross_entropy(flow.classify(x), y)
                    (loss / training.accumulation_steps).backward()
                    loss_sum += loss.detach().double()
                average_gradients(flow, ctx)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(flow.parameters(), training.grad_clip))
                optimizer.step()
                scheduler.step()
                update_lipschitz(flow, tol=training.lipschitz_tol, max_iterations=training.lipschitz_max_iterations)
                ema.update(flow)
                step += 1
                window_images += training.batch_size * training.accumulation_steps
                if bar is not None:
                    bar.update(1)
                if step % training.log_every == 0 or step == total_steps:
                    mean_loss = float(all_reduce_sum(loss_sum, ctx) / (ctx.world_size * training.accumulation_steps))
                    now = time.time()
                    entry = {
                        "step": step,
                        ("train_surrogate_bpd" if density else "train_cross_entropy"): mean_loss,
                        "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                        "images_per_s": window_images / max(now - window_start, 1e-9),
                        **{f"solver_{k_}": v for k_, v in solver_stats(flow).items()
                           if k_.endswith("evaluations") or k_.endswith("converged_fraction")},
                    }
                    log.append(entry)
                    if ctx.is_main:
                        with open(out / "log.jsonl", "a") as f:
                            f.write(json.dumps(entry) + "\n")
                    window_start, window_images = now, 0
                    if bar is not None:
                        shown = ("train_surrogate_bpd", "train_cross_entropy", "grad_norm")
                        bar.set_postfix({k_: round(v, 4) for k_, v in entry.items() if k_ in shown})
                if training.eval_every and step % training.eval_every == 0 and step < total_steps:
                    evals.append({"step": step, **_evaluate_curve_point(flow, ema, test_data, ctx, training, density,
                                                                       seed, eval_limit)})
                if step % training.checkpoint_every == 0 or stop.requested:
                    save(finished=False)
                if stop.requested:
                    raise _Preempted()
        except _Preempted:
            if bar is not None:
                bar.close()
            if ctx.is_main:
                print(f"stopped at step {step}; checkpoint saved in {out}; rerun the same command to resume")
            return {"preempted": True, "step": step, "run_dir": str(out)}
    if bar is not None:
        bar.close()
    train_seconds = elapsed_before + (time.time() - loop_start)
    save(finished=not stopped_by_budget)

    record: Dict[str, Any] = {
        "kind": "images", "preset": spec.name, "model": model_name, "dataset": spec.dataset, "scale": spec.scale,
        "seed": seed, "params": n_params, "paper_bpd": spec.paper_bpd if model_name == spec.model.model_name else None,
        "paper_params": spec.paper_params if model_name == spec.model.model_name else None,
        "iterations": step, "steps_per_epoch": steps_per_epoch, "epochs": step / steps_per_epoch,
        "wall_time_s": train_seconds, "peak_memory_mb": peak_memory_mb(ctx.device),
        "precision": policy, "model_config": asdict(config), "training_config": asdict(training),
        "train_log": log, "evaluations": evals, "provenance": provenance(ctx.device, ctx.world_size),
        "description": spec.description, "notes": spec.notes, "stopped_by_time_budget": stopped_by_budget,
    }
    if final_evaluation and training.eval_every and training.eval_curve_images > 0 and not stopped_by_budget \
            and not any(e["step"] == step for e in evals):
        # the learning curve's last point, measured as its other points are (the final evaluation
        # below uses every test image and several draws, so it is not comparable with them)
        evals.append({"step": step, **_evaluate_curve_point(flow, ema, test_data, ctx, training, density,
                                                           seed, eval_limit)})
        record["evaluations"] = evals
    if final_evaluation:
        final = _evaluate(flow, ema, test_data, ctx, training, density, seed, eval_limit,
                          samples_to=out if ctx.is_main else None)
        record["metrics"] = {k_: v for k_, v in final.items() if k_ != "samples"}
        record["samples"] = final.get("samples")
        record["evaluation_seconds"] = final["seconds"]
    if density and log:
        record["metrics"] = {**record.get("metrics", {}), "train_surrogate_bpd_last": log[-1]["train_surrogate_bpd"]}
    if ctx.is_main:
        write_json(record, out / "run.json")
        folder_lock.release()
    barrier(ctx)
    return record


def _evaluate_curve_point(flow: ImageFlow, ema: ExponentialMovingAverage, test_data: ImageArray,
                          ctx: DistributedContext, training, density: bool, seed: int, limit: int) -> Dict[str, Any]:
    """An evaluation during training: as at the end, or one draw on the first
    ``eval_curve_images`` test images when the training config sets it (a cheaper learning curve)."""
    if training.eval_curve_images > 0:
        limit = min(limit, training.eval_curve_images) if limit > 0 else training.eval_curve_images
        training = replace(training, n_eval_draws=1)
    return _evaluate(flow, ema, test_data, ctx, training, density, seed, limit)


def _evaluate(flow: ImageFlow, ema: ExponentialMovingAverage, test_data: ImageArray, ctx: DistributedContext,
              training, density: bool, seed: int, limit: int, samples_to: Optional[Path] = None) -> Dict[str, Any]:
    """Evaluate the EMA weights (power iterations converged); optionally write a sample grid."""
    start = time.time()
    model = copy.deepcopy(flow)
    ema.copy_to(model)
    for module in model.modules():  # solver records copied from training are not this evaluation's
        if isinstance(getattr(module, "last_solves", None), dict):
            module.last_solves.clear()
    power_iterations = prepare_for_evaluation(model)
    certificates = certificate_summary(model) if ctx.is_main else {}
    if density:
        out = evaluate_bpd(model, test_data, ctx, batch_size=training.eval_batch_size,
                           n_draws=training.n_eval_draws, seed=batch_seed(seed, 4), limit=limit)
    else:
        out = evaluate_accuracy(model, test_data, ctx, batch_size=training.eval_batch_size, limit=limit)
    out["power_iterations_to_converge"] = power_iterations
    out.update(certificates)
    if samples_to is not None and density and training.n_samples > 0:
        gen = torch.Generator().manual_seed(batch_seed(seed, 5))
        images = model.sample(training.n_samples, generator=gen)
        save_image_grid(images, Path(samples_to) / "samples.png")
        out["samples"] = "samples.png"
    out["seconds"] = time.time() - start
    return out

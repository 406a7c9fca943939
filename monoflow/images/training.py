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

import contextlib
import copy
import json
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from monoflow.blocks import solver_stats
from monoflow.data.images import ImageArray, batches_per_epoch, iterate_batches, load_image_dataset, spread_subset
from monoflow.lipschitz import certify_lipschitz, set_learnable_concat, update_lipschitz
from monoflow.models.image import ImageFlow, ImagePreset, count_parameters, get_image_preset
from monoflow.checkpoint import FolderLock, atomic_write_text, capture_rng_state, restore_rng_state, save_checkpoint
from monoflow.images.checkpoint import (check_same_run, checkpoint_path, load_checkpoint, load_rng_state, read_record,
                                       rng_path)
from monoflow.images.distributed import (DistributedContext, all_reduce_sum, average_gradients, barrier,
                                         broadcast_module, init_distributed)
from monoflow.images.ema import ExponentialMovingAverage
from monoflow.images.evaluation import batch_seed, evaluate_accuracy, evaluate_bpd, prepare_for_evaluation
from monoflow.images.results import provenance, run_directory, write_json
from monoflow.images.sampling import save_image_grid
from monoflow.training import LoopState, RunLog, train_run

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
    stop_after: Optional[int] = None,
) -> Dict[str, Any]:
    """Train (or resume) the image flow of ``preset`` and write ``run.json``; returns its content.
    The loop is :func:`monoflow.training.train_run`, shared with the toy and 1-D experiments.

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
        stop_after: stop with a checkpoint after this many steps in total (the run stays
            unfinished; rerunning resumes it).

    Returns:
        The run record, or ``{"status": "interrupted", "preempted": True, "step": ..., ...}`` for a
        run stopped by SIGTERM / SIGINT or ``stop_after``.
    """
    if iterations is not None and iterations <= 0:
        raise ValueError(f"iterations must be a positive number of optimiser steps, got {iterations}")
    run = _ImageRun(preset, model=model, data_root=data_root, results_dir=results_dir, seed=seed,
                    iterations=iterations, device=device, allow_tf32=allow_tf32, model_overrides=model_overrides,
                    training_overrides=training_overrides, train_data=train_data, test_data=test_data,
                    eval_limit=eval_limit, run_dir=run_dir, final_evaluation=final_evaluation)
    return train_run(run, progress=progress, stop_after=stop_after, max_seconds=max_seconds)


@dataclass
class _ImageRunState(LoopState):
    """The loop's state plus the training log (one entry every ``log_every`` steps) and the
    learning curve's evaluations."""

    log: List[Dict[str, Any]] = field(default_factory=list)
    evaluations: List[Dict[str, Any]] = field(default_factory=list)


class _ImageRun:
    """One image-flow run as a :class:`~monoflow.training.TrainingRun` (SPEC.md section 4; the
    module docstring lists what a step does)."""

    def __init__(self, preset: str, *, model: Optional[str], data_root: Optional[str], results_dir: str, seed: int,
                 iterations: Optional[int], device: Optional[str], allow_tf32: bool, model_overrides: Optional[dict],
                 training_overrides: Optional[dict], train_data: Optional[ImageArray],
                 test_data: Optional[ImageArray], eval_limit: int, run_dir: Optional[str],
                 final_evaluation: bool) -> None:
        self.ctx = ctx = init_distributed(device)
        self.is_main = ctx.is_main
        self.policy = apply_precision_policy(allow_tf32)
        self.spec = get_image_preset(preset)
        self.config, self.training, self.model_name = build_run(self.spec, model, model_overrides,
                                                                training_overrides)
        _check_training_config(self.training)
        self.seed, self.eval_limit, self.final_evaluation = seed, eval_limit, final_evaluation
        self.out = Path(run_dir) if run_dir else run_directory(results_dir, self.spec.name, self.model_name, seed)
        self.label = f"{self.spec.name}/{self.model_name}"
        self.log_path = self.out / "train.log"
        self.state = _ImageRunState()
        self._load_data(data_root, train_data, test_data, iterations)

    def _load_data(self, data_root: Optional[str], train_data: Optional[ImageArray],
                   test_data: Optional[ImageArray], iterations: Optional[int]) -> None:
        spec, training, ctx = self.spec, self.training, self.ctx
        self.train_data = train_data if train_data is not None else load_image_dataset(spec.dataset, data_root,
                                                                                       train=True)
        self.test_data = test_data if test_data is not None else load_image_dataset(spec.dataset, data_root,
                                                                                    train=False)
        if tuple(self.train_data.shape) != tuple(self.config.image_shape):
            raise ValueError(f"data images have shape {self.train_data.shape}, the model expects "
                             f"{self.config.image_shape}")
        if training.batch_size % ctx.world_size:
            raise ValueError(f"batch size {training.batch_size} is not divisible by the {ctx.world_size} ranks")
        self.local_batch = training.batch_size // ctx.world_size
        self.batches_per_epoch = batches_per_epoch(len(self.train_data), training.batch_size)
        self.steps_per_epoch = max(1, self.batches_per_epoch // training.accumulation_steps)
        self.total_steps = iterations or training.iterations or training.epochs * self.steps_per_epoch
        self.learnable_concat_step = training.start_learnable_concat_epoch * self.steps_per_epoch
        self.density = self.config.task == "density"

    def log(self, message: str) -> None:
        if self.is_main:
            RunLog(self.log_path, echo=True)(message)

    def _checkpoint(self) -> Optional[Dict[str, Any]]:
        """The run folder's checkpoint, refused if it is another run's or another configuration's.
        Read once: the check inside the lock reuses the state read before it, unless the file changed."""
        path = checkpoint_path(self.out)
        stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
        if stamp is not None and stamp == getattr(self, "_checkpoint_stamp", None):
            return self.checkpoint
        self._checkpoint_stamp = stamp
        state = load_checkpoint(self.out, map_location=self.ctx.device)
        if state is not None:
            if state["preset"] != self.spec.name or state["model_name"] != self.model_name:
                raise ValueError(f"{self.out} holds a checkpoint of {state['preset']}/{state['model_name']}, "
                                 f"not {self.spec.name}/{self.model_name}")
            check_same_run(state, self.config, self.training, self.out)
        return state

    def finished_record(self) -> Optional[Dict[str, Any]]:
        self.checkpoint = self._checkpoint()
        state = self.checkpoint
        if state is not None and state.get("finished") and state["step"] >= self.total_steps \
                and (self.out / "run.json").exists():
            if self.is_main:
                print(f"{self.out} is complete ({state['step']} steps); delete run.json to evaluate again")
            return read_record(self.out / "run.json")
        return None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        lock = FolderLock(self.out) if self.is_main else contextlib.nullcontext()
        with lock:
            barrier(self.ctx)
            yield

    def prepare(self) -> None:
        self._build()
        if self.checkpoint is not None:
            self._restore(self.checkpoint)
        self.checkpoint = None
        if self.is_main:  # log.jsonl mirrors the checkpoint's log: no lines of steps done after it,
            # nor of an earlier run in this folder that left no checkpoint
            atomic_write_text(self.out / "log.jsonl", "".join(json.dumps(entry) + "\n" for entry in self.state.log))
        self.window_start, self.window_images = time.time(), 0
        self.flow.train()

    def _build(self) -> None:
        """The model (same seeded initial weights and data-dependent ActNorm on every rank, then
        rank 0's copy), Adam with linear warm-up, and the EMA."""
        ctx, config, training, seed = self.ctx, self.config, self.training, self.seed
        torch.manual_seed(seed)
        self.model = self.flow = flow = ImageFlow(config).to(ctx.device)
        self.n_params = count_parameters(flow)
        first_idx = np.random.default_rng([seed, 0]).permutation(len(self.train_data))[:training.batch_size]
        k0, _ = self.train_data.batch(first_idx)
        u0 = torch.rand(k0.shape, generator=torch.Generator().manual_seed(batch_seed(seed, 6)))
        part0 = slice(ctx.rank * self.local_batch, (ctx.rank + 1) * self.local_batch)
        with torch.no_grad():  # data-dependent ActNorm initialisation (synchronised), lazy SN state
            x0 = (k0[part0].to(ctx.device).float() + u0[part0].to(ctx.device)) / config.n_levels
            flow(x0, with_logdet=False)
        broadcast_module(flow, ctx)
        torch.manual_seed(batch_seed(seed, 2, ctx.rank))
        np.random.seed(batch_seed(seed, 3, ctx.rank) % 2**32)
        self.optimizer = torch.optim.Adam(flow.parameters(), lr=training.lr, betas=tuple(training.betas),
                                          weight_decay=training.weight_decay)
        warmup = max(1, training.warmup_iterations)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.ema = ExponentialMovingAverage(flow, training.ema_decay)

    def _restore(self, state: Dict[str, Any]) -> None:
        self.flow.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.ema.load_state_dict(state["ema"])
        self.state = _ImageRunState(step=state["step"], elapsed_s=state.get("train_seconds", 0.0),
                                    sessions=list(state.get("sessions", [])), log=state["log"],
                                    evaluations=state["evaluations"])
        rng_state = load_rng_state(self.out, self.ctx.rank)
        if rng_state is not None:
            restore_rng_state(rng_state)
        self.log(f"resuming {self.out} at step {self.state.step}/{self.total_steps}")

    def session_notes(self) -> Dict[str, Any]:
        return {"provenance": provenance(self.ctx.device, self.ctx.world_size)}

    def _micro_batch(self, m: int):
        """Micro-batch ``m`` of the run (global numbering): this rank's slice of the images, labels
        and dequantisation noise, augmented with the generator of (seed, m)."""
        training, ctx = self.training, self.ctx
        epoch, b = divmod(m, self.batches_per_epoch)
        # the whole global batch: its augmentation and noise do not depend on the number of ranks
        idx = next(iterate_batches(len(self.train_data), training.batch_size, seed=self.seed, epoch=epoch, start=b))
        k, y = self.train_data.batch(idx)
        gen = torch.Generator().manual_seed(batch_seed(self.seed, 1, m))
        k = augment_batch(k, gen, training.random_flip, training.random_crop_padding)
        noise = torch.rand(k.shape, generator=gen)
        part = slice(ctx.rank * self.local_batch, (ctx.rank + 1) * self.local_batch)
        return k[part].to(ctx.device), y[part].to(ctx.device), noise[part].to(ctx.device)

    def _loss(self, k: torch.Tensor, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The training-surrogate bpd (or the cross-entropy) of one micro-batch."""
        if self.density and self.config.dequantization == "variational":
            return self.flow.bits_per_dim(k).mean()  # the model draws its noise (per-rank RNG)
        if self.density:
            return self.flow.bits_per_dim(k, noise=noise).mean()
        return F.cross_entropy(self.flow.classify((k.float() + noise) / self.config.n_levels), y)

    def train_step(self, step: int) -> torch.Tensor:
        training, flow = self.training, self.flow
        set_learnable_concat(flow, step >= self.learnable_concat_step)
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for a in range(training.accumulation_steps):
            loss = self._loss(*self._micro_batch(step * training.accumulation_steps + a))
            (loss / training.accumulation_steps).backward()
            self.loss_sum += loss.detach().double()
        average_gradients(flow, self.ctx)
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(flow.parameters(), training.grad_clip))
        if not np.isfinite(self.grad_norm):  # the same on every rank: the gradients are averaged
            return torch.tensor(self.grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        update_lipschitz(flow, tol=training.lipschitz_tol, max_iterations=training.lipschitz_max_iterations)
        self.ema.update(flow)
        return self.loss_sum / training.accumulation_steps

    def after_step(self, loss: torch.Tensor) -> Optional[Dict[str, Any]]:
        training, step = self.training, self.state.step
        self.window_images += training.batch_size * training.accumulation_steps
        if not (step % training.log_every == 0 or step == self.total_steps):
            return None
        mean_loss = float(all_reduce_sum(self.loss_sum, self.ctx) / (self.ctx.world_size * training.accumulation_steps))
        now = time.time()
        entry = {
            "step": step,
            ("train_surrogate_bpd" if self.density else "train_cross_entropy"): mean_loss,
            "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": self.grad_norm,
            "images_per_s": self.window_images / max(now - self.window_start, 1e-9),
            **{f"solver_{key}": value for key, value in solver_stats(self.flow).items()
               if key.endswith("evaluations") or key.endswith("converged_fraction")},
        }
        self.state.log.append(entry)
        if self.is_main:
            with open(self.out / "log.jsonl", "a") as handle:
                handle.write(json.dumps(entry) + "\n")
        self.window_start, self.window_images = now, 0
        shown = ("train_surrogate_bpd", "train_cross_entropy", "grad_norm")
        return {key: round(value, 4) for key, value in entry.items() if key in shown}

    def evaluation_due(self, step: int) -> bool:
        """Every ``eval_every`` steps, and at the last step when a final evaluation follows: that
        point is then in the finished checkpoint, so a run continued past it keeps it."""
        if not self.training.eval_every:
            return False
        if step == self.total_steps:
            return self._takes_last_curve_point()
        return step % self.training.eval_every == 0

    def _takes_last_curve_point(self) -> bool:
        """Whether the curve gets a point at the last step (evaluated as the other points are)."""
        return self.final_evaluation and bool(self.training.eval_every) and self.training.eval_curve_images > 0

    def evaluate(self, loss: torch.Tensor) -> None:
        self.state.evaluations.append({"step": self.state.step, **self._curve_point()})

    def _curve_point(self) -> Dict[str, Any]:
        # a run resumed from a checkpoint whose curve predates the spread subset keeps the test
        # images it started with (the split's first ones), so that its curve stays one curve
        earlier = self.state.evaluations
        first_images = (bool(earlier) and "curve_subset" not in earlier[0]
                        and earlier[0].get("n_test_images", len(self.test_data)) < len(self.test_data))
        return _evaluate_curve_point(self.flow, self.ema, self.test_data, self.ctx, self.training, self.density,
                                     self.seed, self.eval_limit, first_images)

    def checkpoint_due(self, step: int, seconds_since_save: float) -> bool:
        return step % self.training.checkpoint_every == 0

    def save(self, finished: bool) -> None:
        ctx, state = self.ctx, self.state
        save_checkpoint(rng_path(self.out, ctx.rank), capture_rng_state())
        if ctx.is_main:
            save_checkpoint(checkpoint_path(self.out), {
                "preset": self.spec.name, "model_name": self.model_name, "model_config": asdict(self.config),
                "training_config": asdict(self.training), "model": self.flow.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": state.step, "log": state.log,
                "evaluations": state.evaluations, "finished": finished, "total_steps": self.total_steps,
                "learnable_concat": state.step >= self.learnable_concat_step, "seed": self.seed,
                "world_size": ctx.world_size, "train_seconds": state.elapsed_s, "sessions": state.sessions,
            })
        barrier(ctx)

    def interrupted(self, reason: Dict[str, Any]) -> Dict[str, Any]:
        return {**reason, "run_dir": str(self.out)}

    def finish(self, stopped_by_time_budget: bool) -> Dict[str, Any]:
        record = self._record(stopped_by_time_budget)
        state, training = self.state, self.training
        if self._takes_last_curve_point() and not stopped_by_time_budget \
                and not any(e["step"] == state.step for e in state.evaluations):
            # the learning curve's last point, measured as its other points are (the final evaluation
            # below uses every test image and several draws, so it is not comparable with them); the
            # step loop takes it already, this is for checkpoints finished before it did
            state.evaluations.append({"step": state.step, **self._curve_point()})
            record["evaluations"] = state.evaluations
        if self.final_evaluation:
            final = _evaluate(self.flow, self.ema, self.test_data, self.ctx, training, self.density, self.seed,
                              self.eval_limit, samples_to=self.out if self.is_main else None)
            record["metrics"] = {key: value for key, value in final.items() if key != "samples"}
            record["samples"] = final.get("samples")
            record["evaluation_seconds"] = final["seconds"]
        if self.density and state.log:
            record["metrics"] = {**record.get("metrics", {}),
                                 "train_surrogate_bpd_last": state.log[-1]["train_surrogate_bpd"]}
        if self.is_main:
            write_json(record, self.out / "run.json")
        barrier(self.ctx)
        return record

    def _record(self, stopped_by_time_budget: bool) -> Dict[str, Any]:
        """run.json without the final evaluation."""
        spec, state, is_preset_model = self.spec, self.state, self.model_name == self.spec.model.model_name
        return {
            "kind": "images", "preset": spec.name, "model": self.model_name, "dataset": spec.dataset,
            "scale": spec.scale, "seed": self.seed, "params": self.n_params,
            "paper_bpd": spec.paper_bpd if is_preset_model else None,
            "paper_params": spec.paper_params if is_preset_model else None,
            "iterations": state.step, "steps_per_epoch": self.steps_per_epoch,
            "epochs": state.step / self.steps_per_epoch, "wall_time_s": state.elapsed_s,
            "peak_memory_mb": peak_memory_mb(self.ctx.device), "precision": self.policy,
            "model_config": asdict(self.config), "training_config": asdict(self.training),
            "train_log": state.log, "evaluations": state.evaluations,
            "provenance": provenance(self.ctx.device, self.ctx.world_size), "sessions": state.sessions,
            "description": spec.description, "notes": spec.notes, "stopped_by_time_budget": stopped_by_time_budget,
        }


def _evaluate_curve_point(flow: ImageFlow, ema: ExponentialMovingAverage, test_data: ImageArray,
                          ctx: DistributedContext, training, density: bool, seed: int, limit: int,
                          first_images: bool = False) -> Dict[str, Any]:
    """An evaluation during training: as at the end, or, when the training config sets
    ``eval_curve_images``, one draw on that many test images spread over the test split
    (:func:`~monoflow.data.images.spread_subset`, the same images at every point; a cheaper curve);
    with ``first_images``, on the split's first ones instead, as runs did before the spread subset."""
    if training.eval_curve_images <= 0:
        return _evaluate(flow, ema, test_data, ctx, training, density, seed, limit)
    n = min(limit, training.eval_curve_images) if limit > 0 else training.eval_curve_images
    one_draw = replace(training, n_eval_draws=1)
    if first_images:
        point = _evaluate(flow, ema, test_data, ctx, one_draw, density, seed, n)
        return {**point, "curve_subset": "all" if n >= len(test_data) else f"first {n}"}
    subset = spread_subset(test_data, n)
    point = _evaluate(flow, ema, subset, ctx, one_draw, density, seed, 0)
    return {**point, "curve_subset": "all" if subset is test_data else "spread, seed 0"}


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

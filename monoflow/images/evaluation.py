r"""Evaluation: unbiased test bits per dimension with its spread over estimator draws, accuracy.

The test bpd is the Russian-roulette estimate with ``eval_n_exact_terms`` exact terms (20) in
evaluation mode, where the log-dets are real (unbiased) estimates. The training loss uses the
Neumann-gradient surrogate, whose *value* is not a log-det; it is reported as
``train_surrogate_bpd`` and never mixed with the test bpd.

Before evaluating, the power iterations of every spectral-normalised layer are run to
convergence (:func:`prepare_for_evaluation`). Each *draw* is a full pass over the test set
with fresh dequantisation noise, probes and roulette lengths, seeded by (seed, draw, batch) so
that it is reproducible and independent of the number of ranks; ``bpd_std`` is the standard
deviation of the per-draw test bpd.
"""
from __future__ import annotations

import math
from typing import Dict, List

import numpy as np
import torch
from torch import nn

from monoflow.blocks import solver_stats
from monoflow.data.images import ImageArray
from monoflow.lipschitz import update_lipschitz
from monoflow.images.distributed import DistributedContext, all_reduce_sum

__all__ = ["prepare_for_evaluation", "evaluate_bpd", "evaluate_accuracy", "batch_seed"]


def batch_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and runs)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
               .astype(np.uint64).dot([1, 2**31]) % (2**63 - 1))


@torch.no_grad()
def prepare_for_evaluation(model: nn.Module, tol: float = 1e-5, max_iterations: int = 1000) -> int:
    """Converge every power iteration (returns the most iterations a layer needed)."""
    return update_lipschitz(model, tol=tol, max_iterations=max_iterations)


def _global_batches(n: int, batch_size: int) -> List[np.ndarray]:
    return [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def evaluate_bpd(model: nn.Module, data: ImageArray, ctx: DistributedContext, *, batch_size: int = 200,
                 n_draws: int = 3, seed: int = 0, limit: int = 0) -> Dict[str, object]:
    """Test bpd of ``model`` (an :class:`~monoflow.models.image.ImageFlow`) on ``data``.

    Returns ``bpd_test`` (mean over draws), ``bpd_std`` (std over draws), ``bpd_draws``,
    ``bpd_image_std`` (std over images within a draw, averaged) and the solver statistics of
    the last batch. ``limit`` > 0 evaluates only the first ``limit`` images.
    """
    was_training = model.training
    model.eval()
    n = len(data) if limit <= 0 else min(limit, len(data))
    batches = _global_batches(n, batch_size)
    draws, image_stds = [], []
    stats: Dict[str, float] = {}
    devices = [ctx.device.index or 0] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for draw in range(n_draws):
            totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # sum, sum of squares, count
            for b, idx in enumerate(batches):
                if b % ctx.world_size != ctx.rank:
                    continue
                k, _ = data.batch(idx)
                k = k.to(ctx.device)
                s = batch_seed(seed, draw, b)
                torch.manual_seed(s)
                gen = torch.Generator().manual_seed(s)
                with torch.no_grad():
                    if model.config.dequantization == "uniform":
                        noise = torch.rand(k.shape, generator=gen).to(ctx.device)
                        bpd = model.bits_per_dim(k, noise=noise).double()
                    else:
                        bpd = model.bits_per_dim(k, generator=gen).double()
                count = torch.tensor(float(len(bpd)), dtype=torch.float64, device=ctx.device)
                totals += torch.stack([bpd.sum(), (bpd ** 2).sum(), count])
                stats = solver_stats(model)
            totals = all_reduce_sum(totals, ctx)
            mean = float(totals[0] / totals[2])
            draws.append(mean)
            image_stds.append(math.sqrt(max(float(totals[1] / totals[2]) - mean ** 2, 0.0)))
    model.train(was_training)
    return {
        "bpd_test": float(np.mean(draws)),
        "bpd_std": float(np.std(draws, ddof=1)) if len(draws) > 1 else 0.0,
        "bpd_draws": draws,
        "bpd_image_std": float(np.mean(image_stds)),
        "n_test_images": n,
        "n_draws": n_draws,
        "solver": stats,
    }


def evaluate_accuracy(model: nn.Module, data: ImageArray, ctx: DistributedContext, *, batch_size: int = 200,
                      limit: int = 0) -> Dict[str, float]:
    """Classification accuracy of ``model.classify`` on ``data`` (images at their bin centres)."""
    was_training = model.training
    model.eval()
    n = len(data) if limit <= 0 else min(limit, len(data))
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for b, idx in enumerate(_global_batches(n, batch_size)):
        if b % ctx.world_size != ctx.rank:
            continue
        k, y = data.batch(idx)
        x = (k.to(ctx.device).float() + 0.5) / model.config.n_levels
        with torch.no_grad():
            pred = model.classify(x).argmax(dim=1).cpu()
        totals += torch.tensor([float((pred == y).sum()), float(len(y))], dtype=torch.float64, device=ctx.device)
    totals = all_reduce_sum(totals, ctx)
    model.train(was_training)
    return {"accuracy": float(totals[0] / totals[1]), "n_test_images": int(totals[1])}

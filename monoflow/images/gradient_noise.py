r"""The gradient noise of a trained image flow: what a cheaper training step may add to it.

A cheaper step (fewer exact log-det terms, looser solver tolerances) changes the gradient
:math:`\nabla_\theta L` that Adam sees. Whether the change matters is a comparison with the noise
SGD has anyway: the spread of the gradient between minibatches,
:math:`\operatorname{tr}\operatorname{Cov}_B(\nabla_\theta L_B)`.
``benchmarks/roulette_terms.py`` and ``benchmarks/solver_tolerance.py`` measure against it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["load_trained_run", "loss_and_gradient", "training_gradient", "covariance_trace", "image_batch",
           "random_image_batch"]


def loss_and_gradient(model: nn.Module, k: Tensor, noise: Tensor, seed: int) -> Tuple[float, np.ndarray]:
    """The training loss (mean bpd) on images ``k`` with dequantisation ``noise`` and the
    estimator's draw ``seed``, and its gradient (all parameters, flattened, float64)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model.bits_per_dim(k, noise=noise, generator=torch.Generator().manual_seed(seed)).mean()
    loss.backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), gradient.double().numpy()


def training_gradient(model: nn.Module, k: Tensor, noise: Tensor, seed: int) -> np.ndarray:
    """The gradient of :func:`loss_and_gradient`."""
    return loss_and_gradient(model, k, noise, seed)[1]


def covariance_trace(samples: List[np.ndarray]) -> float:
    """Unbiased :math:`\\operatorname{tr}\\operatorname{Cov}` of vectors (the sum of the coordinates'
    sample variances)."""
    stacked = np.stack(samples)
    return float(stacked.var(axis=0, ddof=1).sum())


def image_batch(data, indices: np.ndarray, seed: int) -> Tuple[Tensor, Tensor]:
    """Images ``indices`` of an :class:`~monoflow.data.images.ImageArray` and uniform dequantisation
    noise drawn from ``seed``."""
    k, _ = data.batch(indices)
    return k, torch.rand(k.shape, generator=torch.Generator().manual_seed(seed))


def random_image_batch(data, rng: np.random.Generator, size: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``size`` images drawn by ``rng`` without replacement, with dequantisation noise from ``seed``."""
    return image_batch(data, np.sort(rng.permutation(len(data))[:size]), seed)


def load_trained_run(run_dir: Path) -> Tuple[Dict[str, Any], nn.Module, Any]:
    """A finished image run's record (``run.json``), its EMA model on the CPU (from the checkpoint)
    and its training images."""
    from monoflow.data.images import load_image_dataset
    from monoflow.images.checkpoint import read_record
    from monoflow.images.training import load_ema_model

    record = read_record(Path(run_dir) / "run.json")
    model = load_ema_model(Path(run_dir), torch.device("cpu"))
    return record, model, load_image_dataset(record["dataset"], None, train=True)

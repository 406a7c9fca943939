"""The power-iteration schedule: :func:`update_lipschitz` updates the power-iteration vectors of
every spectral-normalised layer of a model (after each optimiser step and before evaluation),
same-shaped linear layers as one batch."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from monoflow.lipschitz.spectral_norm import SpectralNormLayer, SpectralNormLinear
from monoflow.lipschitz.validation import _check_positive_int

__all__ = ["update_lipschitz"]



def update_lipschitz(
    model: nn.Module,
    n_iterations: Optional[int] = None,
    tol: Optional[float] = None,
    max_iterations: int = 200,
) -> int:
    """Run :meth:`SpectralNormLayer.power_iteration` on every spectral-normalised layer of
    ``model`` (toy training: ``n_iterations=5``; images and evaluation: ``tol=1e-3``, at most
    ``max_iterations``). Convolutions that have not seen an input yet are skipped. Returns the
    largest number of iterations any layer ran."""
    layers = [m for m in model.modules() if isinstance(m, SpectralNormLayer) and m.has_power_iteration_state()]
    if n_iterations is not None and tol is None:
        # a fixed number of iterations: linear layers of the same shape run as one batch
        _check_positive_int(n_iterations, "n_iterations", allow_zero=True)
        groups: dict = {}
        for layer in layers:
            if type(layer) is SpectralNormLinear:
                groups.setdefault((tuple(layer.weight.shape), layer.weight.dtype, layer.weight.device), []).append(layer)
        for group in groups.values():
            _batched_power_iteration(group, n_iterations)
        batched = {id(layer) for group in groups.values() for layer in group}
        layers = [layer for layer in layers if id(layer) not in batched]
        if batched and not layers:
            return n_iterations
    most = 0
    for layer in layers:
        most = max(most, layer.power_iteration(n_iterations, tol, max_iterations))
    return most


@torch.no_grad()
def _batched_power_iteration(layers: Sequence["SpectralNormLinear"], n_iterations: int) -> None:
    """``n_iterations`` power iterations on each layer's weight, all layers (same weight shape) at
    once with batched matrix products; the same updates as ``layer.power_iteration(n)``."""
    weights = torch.stack([layer.weight.detach() for layer in layers])  # (L, out, in)
    u = torch.stack([layer.u for layer in layers]).unsqueeze(-1)  # (L, out, 1)
    v = torch.stack([layer.v for layer in layers]).unsqueeze(-1)
    for _ in range(n_iterations):
        v = torch.bmm(weights.transpose(1, 2), u)
        v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)
        u = torch.bmm(weights, v)
        u = u / u.norm(dim=1, keepdim=True).clamp(min=1e-12)
    torch._foreach_copy_([layer.u for layer in layers], list(u.squeeze(-1).unbind(0)))
    torch._foreach_copy_([layer.v for layer in layers], list(v.squeeze(-1).unbind(0)))

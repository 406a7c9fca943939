"""Chains of spectral-normalised layers and elementwise activations (Residual Flow's g), and the
forward propagation of the Jacobian through a sequence of layers for flat inputs."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["LipschitzChain"]



class LipschitzChain(nn.Sequential):
    r"""Spectral-normalised linear layers and elementwise activations applied in order (Residual
    Flow's g, :func:`monoflow.models.toy.lipswish_mlp`), :math:`\mathrm{Lip} \le \prod_\ell
    \mathrm{Lip}(\ell)`, with forward propagation of the Jacobian for flat inputs (:meth:`jacobian`)."""

    def jacobian(self, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""``(g(w), J)`` for ``w`` of shape (B, d), ``J[b] = dg/dw`` at ``w[b]`` (B, d_out, d):
        :math:`J \leftarrow \bar W J` through a linear layer, :math:`J \leftarrow a'(h) \odot J`
        through an activation (ordinary differentiable ops, so it can be trained through)."""
        if w.dim() != 2:
            raise ValueError(f"LipschitzChain.jacobian expects flat inputs (B, d), got shape {tuple(w.shape)}")
        return _propagate_jacobian(self, w)


def _propagate_jacobian(layers: Sequence[nn.Module], w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(g(w), dg/dw)`` through ``layers`` for flat ``w`` (B, d): each layer steps with its
    ``forward_with_jacobian``, or as an elementwise activation with its ``derivative``."""
    batch, dim = w.shape
    # propagated transposed, (B, d, channels), so each linear map is one batched GEMM
    jac = torch.eye(dim, dtype=w.dtype, device=w.device).expand(batch, dim, dim)
    x = w
    for layer in layers:
        if hasattr(layer, "forward_with_jacobian"):
            x, jac = layer.forward_with_jacobian(x, jac)
        elif hasattr(layer, "value_and_derivative") and not getattr(layer, "concatenates", False):
            x, slope = layer.value_and_derivative(x)
            jac = slope.unsqueeze(1) * jac
        elif hasattr(layer, "derivative") and not getattr(layer, "concatenates", False):
            x, jac = layer(x), layer.derivative(x).unsqueeze(1) * jac
        else:
            raise ValueError(f"LipschitzChain.jacobian needs linear layers with forward_with_jacobian and "
                             f"elementwise activations with derivative; got a {type(layer).__name__}")
    return x, jac.transpose(1, 2)

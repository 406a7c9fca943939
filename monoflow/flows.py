r"""A normalizing flow: a sequence of blocks and a standard normal base.

.. math:: \log p(x) = \log \mathcal{N}(z; 0, I) + \sum_i \log|\det \partial f_i/\partial x_{i-1}|,
          \qquad z = f_n \circ \dots \circ f_1(x).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from monoflow.lipschitz import reuse_parameter_transforms

__all__ = ["StandardNormal", "Flow"]


class StandardNormal(nn.Module):
    """The base distribution :math:`\\mathcal{N}(0, I)` over events of a given shape."""

    def log_prob(self, z: Tensor) -> Tensor:
        """Log-density summed over all but the batch dimension, shape (batch,)."""
        return (-0.5 * (z * z + math.log(2 * math.pi))).reshape(z.shape[0], -1).sum(dim=1)

    def sample(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
               device=None, dtype=None) -> Tensor:
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def _add(total: Optional[Tensor], term: Optional[Tensor]) -> Optional[Tensor]:
    if total is None or term is None:
        return None
    return total + term


class Flow(nn.Module):
    """Blocks applied in order, with the shared block interface.

    ``z, logdet = flow(x)``, ``x, logdet = flow.inverse(z)``, ``flow.log_prob(x)`` of shape
    (batch,) and ``flow.sample(n)``. ``event_shape`` (the shape of one sample) is checked on input
    and needed by :meth:`sample`.

    Example:
        >>> from monoflow.blocks import ActNorm
        >>> flow = Flow([ActNorm(2)], event_shape=(2,))
        >>> flow.log_prob(torch.randn(4, 2)).shape
        torch.Size([4])
    """

    def __init__(self, blocks: Iterable[nn.Module], event_shape: Optional[Sequence[int]] = None,
                 base: Optional[StandardNormal] = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        if len(self.blocks) == 0:
            raise ValueError("a Flow needs at least one block")
        self.event_shape = None if event_shape is None else tuple(int(s) for s in event_shape)
        self.base = base if base is not None else StandardNormal()

    def _check(self, x: Tensor, what: str) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        parameter = next(self.parameters(), None)
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
        if parameter is not None and x.dtype != parameter.dtype:
            raise TypeError(f"{what} has dtype {x.dtype} but the flow's weights are {parameter.dtype}; convert one "
                            f"(x.to({parameter.dtype}) or flow.to({x.dtype}))")
        if self.event_shape is not None and tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(
                f"{what} must have shape (batch, {', '.join(map(str, self.event_shape))}), got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        """:math:`z = f(x)` and :math:`\\log|\\det \\partial z/\\partial x|`."""
        self._check(x, "Flow input")
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device) if with_logdet else None
        with reuse_parameter_transforms():  # each g's normalised weights once per pass
            for block in self.blocks:
                x, logdet = block(x, with_logdet=with_logdet)
                total = _add(total, logdet)
        return x, total

    def inverse(self, z: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        """:math:`x = f^{-1}(z)` and :math:`\\log|\\det \\partial x/\\partial z|`."""
        self._check(z, "Flow.inverse input")
        total = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device) if with_logdet else None
        with reuse_parameter_transforms():
            for block in reversed(self.blocks):
                z, logdet = block.inverse(z, with_logdet=with_logdet)
                total = _add(total, logdet)
        return z, total

    def log_prob(self, x: Tensor) -> Tensor:
        """:math:`\\log p(x)` of shape (batch,)."""
        z, logdet = self(x)
        if logdet is None:
            raise RuntimeError("this flow computes no log-determinant (built with logdet=None)")
        return self.base.log_prob(z) + logdet

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """n samples :math:`x = f^{-1}(z)`, :math:`z \\sim \\mathcal{N}(0, I)` (no gradients)."""
        if self.event_shape is None:
            raise RuntimeError("Flow.sample needs event_shape; pass it to the constructor")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        parameter = next(self.parameters(), None)
        device = parameter.device if parameter is not None else None
        dtype = parameter.dtype if parameter is not None else None
        z = self.base.sample((n,) + self.event_shape, generator=generator, device=device, dtype=dtype)
        with torch.no_grad():
            x, _ = self.inverse(z, with_logdet=False)
        return x

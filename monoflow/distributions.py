r"""The blocks as :class:`torch.distributions.Transform` objects.

:class:`BlockTransform` wraps any module with the block interface (``y, logdet = block(x)``,
``x, logdet = block.inverse(y)``: the blocks of :mod:`monoflow.blocks`, the image transforms, a
whole :class:`~monoflow.flows.Flow`) as a transform :math:`T` with

.. math:: T(x) = y, \qquad T^{-1}(y) = x, \qquad
          \log|\det \partial T(x)/\partial x| = \text{the block's logdet at } x,

so blocks compose with :class:`~torch.distributions.TransformedDistribution`,
:class:`~torch.distributions.transforms.ComposeTransform` and the rest of
:mod:`torch.distributions`. A flow maps data to the latent, so the distribution of the data is
``TransformedDistribution(base, BlockTransform(flow, event_dim).inv)``; :meth:`Flow.distribution
<monoflow.flows.Flow.distribution>` builds exactly that.

Example:
    >>> from torch.distributions import Independent, Normal, TransformedDistribution
    >>> from monoflow.blocks import MonotoneBlock
    >>> from monoflow.lipschitz import dense_mlp
    >>> block = MonotoneBlock(dense_mlp(2, 2, 8, "cpila", coeff=0.9, lip_coeff=0.98))
    >>> base = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    >>> density = TransformedDistribution(base, BlockTransform(block).inv)  # x = block^-1(z)
    >>> density.rsample((3, 5)).shape, density.log_prob(torch.randn(4, 2)).shape
    (torch.Size([3, 5, 2]), torch.Size([4]))
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.distributions import constraints
from torch.distributions.transforms import Transform

__all__ = ["BlockTransform"]


class BlockTransform(Transform):
    r"""A block (or a flow) as a bijective :class:`torch.distributions.Transform`.

    Inputs may have any leading shape in front of the last ``event_dim`` dimensions; they are
    flattened into the block's batch dimension and restored on output, and the log-det has the
    leading shape (the event dimensions are summed, as the blocks do).

    The forward call keeps its log-det for the very next :meth:`log_abs_det_jacobian` of the same
    ``(x, y)``, so ``TransformedDistribution.log_prob`` costs one pass through the block, as
    ``flow.log_prob`` does; the inverse runs without log-det (sampling does not need it), and
    :meth:`log_abs_det_jacobian` of any other pair recomputes the block forward.

    Args:
        block: a module with the block interface and a log-det (not built with ``logdet=None``).
        event_dim: number of trailing dimensions that form one event (1 for vectors, 3 for images).
        cache_size: 0 or 1, as for every torch transform (1: remember the last ``x, y`` pair).
    """

    bijective = True

    def __init__(self, block: nn.Module, event_dim: int = 1, cache_size: int = 0) -> None:
        if not isinstance(block, nn.Module) or not callable(getattr(block, "inverse", None)):
            raise TypeError(f"block must be an nn.Module with an inverse method, got {type(block).__name__}")
        if isinstance(event_dim, bool) or not isinstance(event_dim, int) or event_dim < 1:
            raise ValueError(f"event_dim must be an int >= 1, got {event_dim!r}")
        super().__init__(cache_size=cache_size)
        self.block = block
        self._event_dim = event_dim
        self._last: Optional[Tuple[Tensor, Tensor, Tensor]] = None  # (x, y, logdet) of the last call

    @property
    def domain(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, self._event_dim)

    @property
    def codomain(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, self._event_dim)

    def with_cache(self, cache_size: int = 1) -> "BlockTransform":
        if self._cache_size == cache_size:
            return self
        return BlockTransform(self.block, self._event_dim, cache_size=cache_size)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, BlockTransform) and other.block is self.block
                and other._event_dim == self._event_dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.block).__name__}, event_dim={self._event_dim})"

    def _flatten(self, x: Tensor) -> Tuple[Tensor, torch.Size]:
        if x.dim() < self._event_dim:
            raise ValueError(f"expected at least {self._event_dim} event dimensions, got shape {tuple(x.shape)}")
        split = x.dim() - self._event_dim
        return x.reshape((-1,) + tuple(x.shape[split:])), x.shape[:split]

    def _call(self, x: Tensor) -> Tensor:
        flat, leading = self._flatten(x)
        y, logdet = self.block(flat)
        y = y.reshape(leading + y.shape[1:])
        self._last = None if logdet is None else (x, y, logdet.reshape(leading))
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        flat, leading = self._flatten(y)
        x, _ = self.block.inverse(flat, with_logdet=False)
        return x.reshape(leading + x.shape[1:])

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        last, self._last = self._last, None  # used once: do not keep the graph alive
        if last is not None and last[0] is x and last[1] is y:
            return last[2]
        flat, leading = self._flatten(x)
        _, logdet = self.block(flat)
        if logdet is None:
            raise RuntimeError(f"{type(self.block).__name__} computes no log-determinant (built with logdet=None)")
        return logdet.reshape(leading)

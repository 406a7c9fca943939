r"""A normalizing flow: a sequence of blocks and a standard normal base.

.. math:: \log p(x) = \log \mathcal{N}(z; 0, I) + \sum_i \log|\det \partial f_i/\partial x_{i-1}|,
          \qquad z = f_n \circ \dots \circ f_1(x).

Besides the block interface, a :class:`Flow` has the face of a
:class:`torch.distributions.Distribution`: ``log_prob``, ``sample``, ``rsample`` and
``sample_and_log_prob`` over a ``sample_shape``, and :meth:`Flow.distribution` returns a real
``TransformedDistribution`` (see :mod:`monoflow.distributions`).
"""
from __future__ import annotations

import math
import operator
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from monoflow.distributions import BlockTransform
from monoflow.lipschitz import reuse_parameter_transforms

__all__ = ["StandardNormal", "Flow"]


class StandardNormal(nn.Module):
    """The base distribution :math:`\\mathcal{N}(0, I)` over events of a given shape.

    Written here rather than taken from ``torch.distributions.Normal`` because it holds no tensors:
    it follows the device and dtype of whatever it is given (a ``Normal`` keeps its ``loc`` and
    ``scale`` where they were made and does not move with ``flow.to(...)``), and it draws with a
    ``torch.Generator``, which ``Distribution.sample`` does not take. :meth:`Flow.distribution`
    gives the ``torch.distributions`` form.
    """

    def log_prob(self, z: Tensor) -> Tensor:
        """Log-density summed over all but the batch dimension, shape (batch,)."""
        return (-0.5 * (z * z + math.log(2 * math.pi))).reshape(z.shape[0], -1).sum(dim=1)

    def sample(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
               device=None, dtype=None) -> Tensor:
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


ShapeLike = Union[int, Sequence[int], torch.Size]


def _sample_shape(sample_shape: ShapeLike) -> torch.Size:
    """``sample_shape`` as a ``torch.Size``; an int n means (n,), as ``Flow.sample(n)`` always did."""
    entries = sample_shape if isinstance(sample_shape, (tuple, list, torch.Size)) else (sample_shape,)
    sizes = []
    for entry in entries:
        try:
            if isinstance(entry, bool):
                raise TypeError
            size = operator.index(entry)  # ints, numpy ints, integer 0-d tensors; not 2.0
        except TypeError:
            raise TypeError(
                f"sample_shape must be an int or a sequence of ints such as (4,) or torch.Size([2, 3]), "
                f"got {sample_shape!r}"
            ) from None
        if size < 0:
            raise ValueError(f"sample sizes must be >= 0, got {sample_shape!r}")
        sizes.append(size)
    return torch.Size(sizes)


def _add(total: Optional[Tensor], term: Optional[Tensor]) -> Optional[Tensor]:
    if total is None or term is None:
        return None
    return total + term


class Flow(nn.Module):
    """Blocks applied in order, with the shared block interface and a distribution's face.

    ``z, logdet = flow(x)`` and ``x, logdet = flow.inverse(z)`` take (batch, *event_shape).
    As for a :class:`torch.distributions.Distribution`, ``flow.log_prob(x)`` takes
    (*sample_shape, *event_shape) and returns sample_shape; ``flow.sample(sample_shape)``,
    ``flow.rsample(sample_shape)`` (differentiable through the inverse solves) and
    ``flow.sample_and_log_prob(sample_shape)`` draw x; an int n means (n,). ``event_shape`` (the
    shape of one sample) is checked on input and needed by the samplers.

    Example:
        >>> from monoflow.blocks import ActNorm
        >>> flow = Flow([ActNorm(2)], event_shape=(2,))
        >>> flow.log_prob(torch.randn(4, 2)).shape
        torch.Size([4])
        >>> x, log_prob = flow.sample_and_log_prob((3, 5))
        >>> x.shape, log_prob.shape, flow.sample(4).shape
        (torch.Size([3, 5, 2]), torch.Size([3, 5]), torch.Size([4, 2]))
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

    @property
    def batch_shape(self) -> torch.Size:
        """One distribution, no batch of them (``torch.distributions`` naming)."""
        return torch.Size()

    def log_prob(self, x: Tensor) -> Tensor:
        """:math:`\\log p(x)` of shape x.shape[:-len(event_shape)] (without event_shape: (batch,))."""
        leading = None
        if self.event_shape is not None and torch.is_tensor(x):
            k = len(self.event_shape)
            if x.dim() >= k and tuple(x.shape[x.dim() - k:]) == self.event_shape:
                leading = x.shape[:x.dim() - k]
                x = x.reshape((-1,) + self.event_shape)
        z, logdet = self(x)
        if logdet is None:
            raise RuntimeError("this flow computes no log-determinant (built with logdet=None)")
        log_prob = self.base.log_prob(z) + logdet
        return log_prob if leading is None else log_prob.reshape(leading)

    def _device_and_dtype(self) -> dict:
        parameter = next(self.parameters(), None)
        return {"device": None, "dtype": None} if parameter is None else {"device": parameter.device,
                                                                           "dtype": parameter.dtype}

    def _draw_base(self, sample_shape: ShapeLike, generator: Optional[torch.Generator]
                   ) -> Tuple[Tensor, torch.Size]:
        """z of shape (prod(sample_shape), *event_shape) on the parameters' device and dtype."""
        shape = _sample_shape(sample_shape)
        if self.event_shape is None:
            raise RuntimeError("sampling a Flow needs event_shape; pass it to the constructor")
        z = self.base.sample((shape.numel(),) + self.event_shape, generator=generator, **self._device_and_dtype())
        return z, shape

    def rsample(self, sample_shape: ShapeLike = torch.Size(), generator: Optional[torch.Generator] = None) -> Tensor:
        """Reparameterised samples :math:`x = f^{-1}(z)`, :math:`z \\sim \\mathcal{N}(0, I)`, of shape
        (*sample_shape, *event_shape); gradients reach the parameters through the inverse solves
        (implicit differentiation, :mod:`monoflow.implicit`)."""
        z, shape = self._draw_base(sample_shape, generator)
        if z.shape[0] == 0:  # nothing to invert
            return z.reshape(shape + self.event_shape)
        x, _ = self.inverse(z, with_logdet=False)
        return x.reshape(shape + self.event_shape)

    def sample(self, sample_shape: ShapeLike = torch.Size(), generator: Optional[torch.Generator] = None) -> Tensor:
        """:meth:`rsample` without gradients; ``flow.sample(n)`` gives (n, *event_shape)."""
        with torch.no_grad():
            return self.rsample(sample_shape, generator)

    def rsample_and_log_prob(self, sample_shape: ShapeLike = torch.Size(),
                             generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        r"""Reparameterised samples and their log-density from one inverse pass:
        :math:`x = f^{-1}(z)` and :math:`\log p(x) = \log\mathcal{N}(z; 0, I) - \log|\det \partial x/\partial z|`,
        shapes (*sample_shape, *event_shape) and sample_shape."""
        z, shape = self._draw_base(sample_shape, generator)
        if z.shape[0] == 0:
            return z.reshape(shape + self.event_shape), z.new_zeros(shape)
        x, logdet = self.inverse(z)
        if logdet is None:
            raise RuntimeError("this flow computes no log-determinant (built with logdet=None)")
        return x.reshape(shape + self.event_shape), (self.base.log_prob(z) - logdet).reshape(shape)

    def sample_and_log_prob(self, sample_shape: ShapeLike = torch.Size(),
                            generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """:meth:`rsample_and_log_prob` without gradients (cheaper than ``sample`` then ``log_prob``,
        which solves again)."""
        with torch.no_grad():
            return self.rsample_and_log_prob(sample_shape, generator)

    def distribution(self) -> torch.distributions.TransformedDistribution:
        """This flow as a :class:`torch.distributions.TransformedDistribution`: the standard normal
        base on the parameters' device and dtype, pushed through ``BlockTransform(flow).inv``."""
        if self.event_shape is None:
            raise RuntimeError("Flow.distribution needs event_shape; pass it to the constructor")
        loc = torch.zeros(self.event_shape, **self._device_and_dtype())
        base = torch.distributions.Independent(torch.distributions.Normal(loc, torch.ones_like(loc)),
                                               len(self.event_shape))
        return torch.distributions.TransformedDistribution(base, BlockTransform(self, len(self.event_shape)).inv)

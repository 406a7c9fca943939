r"""Invertible image transforms around the flow blocks of the multi-scale image model.

All follow the block interface of :mod:`monoflow.blocks`::

    y, logdet = t(x)          # logdet = log|det dy/dx|, shape (batch,)
    x, logdet = t.inverse(y)  # logdet = log|det dx/dy|

* :class:`Squeeze`: space-to-depth, (C, H, W) -> (4C, H/2, W/2); volume preserving.
* :class:`LogitTransform`: :math:`y = \mathrm{logit}(\alpha + (1-2\alpha)x)` on [0, 1] images.
* :class:`Normalize`: :math:`y = (x - \mu)/\sigma` per channel (the classification input layer).
* :class:`Flatten`: runs a transform of flat vectors on (C, H, W) tensors (fully connected blocks).
* :class:`UniformDequantization` and :class:`VariationalDequantization`: from integer images to
  continuous ones; their "log-det" is the dequantisation term of the likelihood bound (below).

Dequantisation. For images with L intensity levels k in {0..L-1}^D, the model density p on
[0,1]^D gives the discrete likelihood bound

.. math:: \log P(k) \ge \mathbb{E}_{u\sim q(\cdot|k)}\big[\log p((k+u)/L) - D\log L - \log q(u|k)\big],

so both dequantisers return :math:`x = (k+u)/L` and the term :math:`-D\log L - \log q(u|k)`
(for uniform noise :math:`q = 1`). With it, bits per dimension are
:math:`-(\log p(z) + \sum\log|\det| - D\log L)/(D\ln 2)`, the formula of SPEC.md section 4.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monoflow.activations import make_activation
from monoflow.blocks import FlowBlock
from monoflow.lipschitz import LipschitzDenseLayer, SpectralNormConv2d
from monoflow.logdet import RESIDUAL, make_estimator

__all__ = [
    "Squeeze",
    "LogitTransform",
    "Normalize",
    "Flatten",
    "UniformDequantization",
    "VariationalDequantization",
    "ConditionalResidualBlock",
    "Bottleneck",
    "quantize",
]


def _zeros(x: Tensor) -> Tensor:
    return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


def _draw(sampler, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Noise shaped like ``like``; with a (CPU) generator it is drawn on the CPU and moved."""
    if generator is None:
        return sampler(like.shape, dtype=like.dtype, device=like.device)
    return sampler(like.shape, generator=generator, dtype=like.dtype).to(like.device)


def _sum_per_sample(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


class Squeeze(FlowBlock):
    r"""Space-to-depth: each ``f x f`` patch of a channel becomes ``f*f`` channels; log-det 0.

    ``(B, C, H, W) -> (B, C f^2, H/f, W/f)``; channel ``c f^2 + i f + j`` holds pixel (i, j) of
    each patch of input channel c.

    >>> y, ld = Squeeze()(torch.arange(16.).reshape(1, 1, 4, 4))
    >>> y.shape, float(ld)
    (torch.Size([1, 4, 2, 2]), 0.0)
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"squeeze factor must be >= 1, got {factor}")
        self.factor = factor

    def forward(self, x: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        if x.dim() != 4:
            raise ValueError(f"Squeeze expects (B, C, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"Squeeze by {f} needs H and W divisible by {f}, got {h}x{w}")
        y = x.reshape(b, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(b, c * f * f, h // f, w // f), _zeros(x)

    def inverse(self, y: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        b, c, h, w = y.shape
        f = self.factor
        if c % (f * f):
            raise ValueError(f"Squeeze.inverse needs channels divisible by {f * f}, got {c}")
        x = y.reshape(b, c // (f * f), f, f, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c // (f * f), h * f, w * f), _zeros(y)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class LogitTransform(FlowBlock):
    r""":math:`y = \log s - \log(1-s)`, :math:`s = \alpha + (1-2\alpha)x`, for x in [0, 1].

    :math:`\log|\det| = \sum_i \log(1-2\alpha) - \log s_i - \log(1-s_i)`. ``alpha`` keeps the
    values away from 0 and 1 (0.05 for colour images, 1e-6 for MNIST in the paper's runs).
    """

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"logit alpha must be in [0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(s) - torch.log1p(-s)
        logdet = _sum_per_sample(math.log1p(-2 * self.alpha) - torch.log(s) - torch.log1p(-s))
        return y, logdet

    def inverse(self, y: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        s = torch.sigmoid(y)
        x = (s - self.alpha) / (1 - 2 * self.alpha)
        logdet = _sum_per_sample(F.logsigmoid(y) + F.logsigmoid(-y) - math.log1p(-2 * self.alpha))
        return x, logdet

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Normalize(FlowBlock):
    r""":math:`y = (x - \mu_c)/\sigma_c`; :math:`\log|\det| = -HW\sum_c\log\sigma_c`."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError("Normalize needs one mean and one positive std per channel")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        y = (x - self.mean) / self.std
        ld = -torch.log(self.std).sum() * x.shape[2] * x.shape[3]
        return y, ld.expand(x.shape[0]).to(x.dtype)

    def inverse(self, y: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        x = y * self.std + self.mean
        ld = torch.log(self.std).sum() * y.shape[2] * y.shape[3]
        return x, ld.expand(y.shape[0]).to(y.dtype)


class Flatten(FlowBlock):
    """Applies ``transform`` (acting on flat (B, D) vectors) to (B, C, H, W) tensors."""

    def __init__(self, transform: nn.Module) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, x: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        y, logdet = self.transform(x.reshape(x.shape[0], -1), with_logdet=with_logdet)
        return y.reshape(x.shape), logdet

    def inverse(self, y: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        x, logdet = self.transform.inverse(y.reshape(y.shape[0], -1), with_logdet=with_logdet)
        return x.reshape(y.shape), logdet


def quantize(x: Tensor, n_levels: int) -> Tensor:
    """Integer levels ``floor(x L)`` clamped to {0..L-1}: the inverse of dequantisation."""
    return torch.clamp(torch.floor(x * n_levels), 0, n_levels - 1)


class UniformDequantization(nn.Module):
    r"""Integer images k (uint8 or float levels) to :math:`x = (k + u)/L`, u ~ U[0,1)^D.

    Returns ``(x, -D log L)``: the term of the likelihood bound in the module docstring. The
    inverse quantises (and returns the opposite term), so sampled images come out as levels / (L-1).
    """

    def __init__(self, n_levels: int = 256) -> None:
        super().__init__()
        if n_levels < 2:
            raise ValueError(f"n_levels must be >= 2, got {n_levels}")
        self.n_levels = n_levels

    def forward(self, k: Tensor, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        k = k.to(torch.get_default_dtype()) if not k.is_floating_point() else k
        u = _draw(torch.rand, k, generator)
        x = (k + u) / self.n_levels
        d = k[0].numel()
        return x, torch.full((k.shape[0],), -d * math.log(self.n_levels), dtype=k.dtype, device=k.device)

    def inverse(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        d = x[0].numel()
        return quantize(x, self.n_levels), torch.full(
            (x.shape[0],), d * math.log(self.n_levels), dtype=x.dtype, device=x.device
        )

    def extra_repr(self) -> str:
        return f"n_levels={self.n_levels}"


# ----------------------------------------------------------------------------------------------
# variational dequantisation


class Bottleneck(nn.Module):
    """Plain conv residual unit for the conditioning path: GN-ReLU-3x3, GN-ReLU-1x1, GN-ReLU-3x3.

    ``out = match(x) + net(x)`` with ``match`` the identity or a 3x3 conv when the channel counts
    differ. Not Lipschitz-constrained: it only ever sees the (fixed) image, never the noise.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 512) -> None:
        super().__init__()
        if in_channels % 16 or hidden % 16:
            raise ValueError("Bottleneck needs in_channels and hidden divisible by 16 (GroupNorm of 16-channel groups)")
        self.net = nn.Sequential(
            nn.GroupNorm(in_channels // 16, in_channels), nn.ReLU(),
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.GroupNorm(hidden // 16, hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.GroupNorm(hidden // 16, hidden), nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 3, padding=1),
        )
        self.match = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.match(x) + self.net(x)


class _ConditionalDenseNet(nn.Module):
    r"""The conditional g(u; k) of a variational-dequantisation block.

    An i-DenseNet on the noise u whose dense layers each get an image feature added to their new
    channels: layer i maps :math:`u_i \mapsto [\eta_1 u_i,\ \eta_2 h_i(u_i) + B_i(c)]` where
    :math:`c` = conv + ``n_bottlenecks`` bottlenecks of the image. The image terms do not depend
    on u, so Lip_u(g) is that of the plain i-DenseNet (< 1).
    """

    def __init__(self, channels: int, depth: int, growth: int, activation: str, coeff: float,
                 lip_coeff: float, cond_channels: int, hidden: int, n_bottlenecks: int) -> None:
        super().__init__()
        self.conditioner = nn.Sequential(
            nn.Conv2d(channels, cond_channels, 3, padding=1),
            *[Bottleneck(cond_channels, cond_channels, hidden) for _ in range(n_bottlenecks)],
        )
        concatenating = activation.lower() in ("cpila", "clipswish", "crelu")
        out = growth // 2 if concatenating else growth
        layers, injections, widths = [], [], []
        total = channels
        for _ in range(depth):
            layers.append(LipschitzDenseLayer(
                SpectralNormConv2d(total, out, 3, coeff=coeff, padding=1), make_activation(activation), lip_coeff=lip_coeff
            ))
            injections.append(Bottleneck(cond_channels, growth, hidden))
            widths.append(total)
            total += growth
        self.layers = nn.ModuleList(layers)
        self.injections = nn.ModuleList(injections)
        self.widths = widths
        self.last = SpectralNormConv2d(total, channels, 1, coeff=coeff, padding=0)
        self.image: Optional[Tensor] = None

    def forward(self, u: Tensor) -> Tensor:
        if self.image is None or self.image.shape[0] != u.shape[0]:
            raise RuntimeError("conditional g called without its image (set .image to a batch of the same size)")
        c = self.conditioner(self.image)
        h = u
        for layer, inject, width in zip(self.layers, self.injections, self.widths):
            out = layer(h)
            h = torch.cat([out[:, :width], out[:, width:] + inject(c)], dim=1)
        return self.last(h)


class ConditionalResidualBlock(nn.Module):
    r"""Residual block :math:`v = u + g(u; k)` on the dequantisation noise, conditioned on image k.

    The log-det :math:`\log\det(I + J_u)` comes from the shared estimators of
    :mod:`monoflow.logdet` (Russian roulette in training and evaluation). Only the forward
    direction is ever needed (noise is drawn, never inferred), so no solve is involved.
    """

    def __init__(self, g: _ConditionalDenseNet, logdet) -> None:
        super().__init__()
        self.g = g
        self.estimator = make_estimator(logdet)

    def forward(self, u: Tensor, image: Tensor) -> Tuple[Tensor, Tensor]:
        self.g.image = image
        try:
            g_u = self.g(u)
            logdet = self.estimator(self.g, u, RESIDUAL, self.training) if self.estimator is not None else _zeros(u)
        finally:
            self.g.image = None
        return u + g_u, logdet


class VariationalDequantization(nn.Module):
    r"""Learned dequantisation noise (Flow++ style): :math:`u = \sigma(f(\epsilon; k))`, :math:`\epsilon\sim N(0,I)`.

    f is ``n_blocks`` :class:`ConditionalResidualBlock` s. With :math:`v = f(\epsilon)`,

    .. math:: \log q(u|k) = \log N(\epsilon) - \log|\det \partial f/\partial\epsilon|
              - \sum_i \log\sigma'(v_i),

    and the module returns :math:`x = (k+u)/L` and :math:`-D\log L - \log q(u|k)`, one number per
    image (the released code returned a (B, B) matrix here, SPEC.md section 5).
    """

    def __init__(self, channels: int, n_levels: int = 256, n_blocks: int = 3, depth: int = 3,
                 growth: int = 172, activation: str = "cpila", coeff: float = 0.98, lip_coeff: float = 0.98,
                 cond_channels: int = 64, hidden: int = 512, n_bottlenecks: int = 3, logdet=None) -> None:
        super().__init__()
        if n_levels < 2:
            raise ValueError(f"n_levels must be >= 2, got {n_levels}")
        self.n_levels = n_levels
        self.blocks = nn.ModuleList(
            ConditionalResidualBlock(
                _ConditionalDenseNet(channels, depth, growth, activation, coeff, lip_coeff,
                                     cond_channels, hidden, n_bottlenecks),
                logdet,
            )
            for _ in range(n_blocks)
        )

    def forward(self, k: Tensor, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        k = k.to(torch.get_default_dtype()) if not k.is_floating_point() else k
        image = k / (self.n_levels - 1) - 0.5
        eps = _draw(torch.randn, k, generator)
        log_q = _sum_per_sample(-0.5 * eps**2 - 0.5 * math.log(2 * math.pi))
        v = eps
        for block in self.blocks:
            v, ld = block(v, image)
            log_q = log_q - ld
        u = torch.sigmoid(v)
        log_q = log_q - _sum_per_sample(F.logsigmoid(v) + F.logsigmoid(-v))
        x = (k + u) / self.n_levels
        d = k[0].numel()
        return x, -d * math.log(self.n_levels) - log_q

    def inverse(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        d = x[0].numel()
        return quantize(x, self.n_levels), torch.full(
            (x.shape[0],), d * math.log(self.n_levels), dtype=x.dtype, device=x.device
        )

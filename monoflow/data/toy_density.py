r"""The true densities of the 2-D toy data sets, and their entropies: the lowest test NLL any model
can reach.

Most of the FFJORD toy sets are a distribution over a curve (or over a few points) blurred by
isotropic Gaussian noise, so their density is a one-dimensional integral

.. math:: p(x) = \int q(s)\, \mathcal{N}(x;\, c(s),\, \sigma^2 I)\, \mathrm{d}s,

evaluated here by the midpoint rule on a grid much finer than :math:`\sigma` (in float64, in log
space). ``2spirals`` adds a uniform jitter, whose convolution with the Gaussian is a product of
normal CDF differences; ``checkerboard`` is uniform on 8 squares of area 4 (entropy
:math:`\log 32` exactly). ``pinwheel`` has no such form and is not covered.

The entropy :math:`H = -\mathbb{E}_p[\log p(x)]` is estimated by Monte Carlo on samples of
:func:`monoflow.data.toy.sample_toy`; a model's test NLL in nats is :math:`H` plus the KL
divergence from the data to the model, so ``NLL - H`` is how far a model is from perfect.

>>> round(toy_entropy("checkerboard")[0], 4)
3.4657
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from monoflow.data.toy import GeneratorLike, TOY_DATASETS, sample_toy

__all__ = ["DENSITY_DATASETS", "toy_log_density", "toy_entropy"]

_LOG_2PI = math.log(2.0 * math.pi)


def _blurred_curve(x: Tensor, centres: Tensor, log_weights: Tensor, sigma: float) -> Tensor:
    r""":math:`\log \sum_i w_i\, \mathcal{N}(x; c_i, \sigma^2 I)` for points x (n, 2), centres (m, 2)."""
    squared = torch.cdist(x, centres).pow(2)  # (n, m)
    log_terms = log_weights[None, :] - squared / (2.0 * sigma**2)
    return torch.logsumexp(log_terms, dim=1) - _LOG_2PI - 2.0 * math.log(sigma)


def _midpoints(low: float, high: float, m: int) -> Tuple[Tensor, float]:
    step = (high - low) / m
    return low + step * (torch.arange(m, dtype=torch.float64) + 0.5), step


def _uniform_circle(radius: float, m: int) -> Tensor:
    theta, _ = _midpoints(0.0, 2.0 * math.pi, m)
    return radius * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)


def _rings_like(x: Tensor, radii, scale_noise: float, m: int = 1440) -> Tensor:
    centres = torch.cat([_uniform_circle(r, m) for r in radii])
    log_weights = torch.full((len(centres),), -math.log(len(centres)), dtype=torch.float64)
    return _blurred_curve(x, centres, log_weights, scale_noise)


def _rings(x: Tensor) -> Tensor:
    return _rings_like(x, [0.75, 1.5, 2.25, 3.0], 0.08)


def _circles(x: Tensor) -> Tensor:
    return _rings_like(x, [3.0, 1.5], 0.24)


def _eight_gaussians(x: Tensor) -> Tensor:
    angle = torch.arange(8, dtype=torch.float64) * (math.pi / 4.0)
    centres = 4.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) / 1.414
    return _blurred_curve(x, centres, torch.full((8,), -math.log(8.0), dtype=torch.float64), 0.5 / 1.414)


def _moons(x: Tensor, m: int = 2000) -> Tensor:
    theta, _ = _midpoints(0.0, math.pi, m)
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    lower = torch.stack([1.0 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=1)
    centres = 2.0 * torch.cat([upper, lower]) + torch.tensor([-1.0, -0.2], dtype=torch.float64)
    log_weights = torch.full((2 * m,), -math.log(2 * m), dtype=torch.float64)
    return _blurred_curve(x, centres, log_weights, 0.2)


def _swissroll(x: Tensor, m: int = 6000) -> Tensor:
    s, _ = _midpoints(1.5 * math.pi, 4.5 * math.pi, m)
    centres = torch.stack([s * torch.cos(s), s * torch.sin(s)], dim=1) / 5.0
    return _blurred_curve(x, centres, torch.full((m,), -math.log(m), dtype=torch.float64), 0.2)


def _log_box_blur(x: Tensor, low: Tensor, width: float, sigma: float) -> Tensor:
    r"""log density at x of :math:`U[\mathrm{low}, \mathrm{low} + w] + \mathcal{N}(0, \sigma^2)`:
    :math:`\log((\Phi((x - l)/\sigma) - \Phi((x - l - w)/\sigma)) / w)`, stable in both tails."""
    a = (x - low) / sigma
    b = (x - low - width) / sigma
    # Phi(a) - Phi(b) = Phi(-b) - Phi(-a): take the side where both are in the lower tail
    upper = b > 0
    hi = torch.where(upper, -b, a)
    lo = torch.where(upper, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi)) - math.log(width)


def _two_spirals(x: Tensor, m: int = 1500) -> Tensor:
    # s = 3 pi sqrt(u): density 2 s / (3 pi)^2 on [0, 3 pi]; per spiral the point is
    # +-(p(s) + j) / 3 + 0.1 eps with j ~ U[0, 0.5]^2
    s, step = _midpoints(0.0, 3.0 * math.pi, m)
    log_q = torch.log(2.0 * s / (3.0 * math.pi) ** 2 * step)
    p = torch.stack([-torch.cos(s) * s, torch.sin(s) * s], dim=1) / 3.0  # (m, 2)
    width, sigma = 0.5 / 3.0, 0.1
    terms = []
    for low in (p, -p - width):  # the spiral and its mirror image
        log_coords = _log_box_blur(x[:, None, :], low[None, :, :], width, sigma)  # (n, m, 2)
        terms.append(log_coords.sum(dim=2) + log_q[None, :])
    return torch.logsumexp(torch.cat(terms, dim=1), dim=1) - math.log(2.0)


def _checkerboard(x: Tensor) -> Tensor:
    inside = (x.abs() <= 4.0).all(dim=1)
    black = torch.remainder(torch.floor(x[:, 0] / 2.0) + torch.floor(x[:, 1] / 2.0), 2.0) == 0
    log_p = torch.full((x.shape[0],), -math.log(32.0), dtype=torch.float64)
    return torch.where(inside & black, log_p, torch.full_like(log_p, -math.inf))


_DENSITIES: Dict[str, Callable[[Tensor], Tensor]] = {
    "swissroll": _swissroll,
    "8gaussians": _eight_gaussians,
    "circles": _circles,
    "moons": _moons,
    "2spirals": _two_spirals,
    "checkerboard": _checkerboard,
    "rings": _rings,
}
#: The toy data sets whose density :func:`toy_log_density` computes (all but pinwheel).
DENSITY_DATASETS = tuple(name for name in TOY_DATASETS if name in _DENSITIES)


def toy_log_density(name: str, x: Tensor, chunk: int = 512) -> Tensor:
    """The data set's true log density at points ``x`` (n, 2), in float64 (nats)."""
    if name not in _DENSITIES:
        valid = ", ".join(DENSITY_DATASETS)
        reason = " (pinwheel has no closed-form density here)" if name == "pinwheel" else ""
        raise ValueError(f"no density for toy data set {name!r}{reason}; available: {valid}")
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"points must have shape (n, 2), got {tuple(x.shape)}")
    x = x.detach().to(torch.float64).cpu()
    return torch.cat([_DENSITIES[name](part) for part in x.split(chunk)])


def toy_entropy(name: str, n: int = 20000, generator: GeneratorLike = 0) -> Tuple[float, float]:
    """Monte Carlo estimate of the data set's entropy in nats and its standard error.

    ``checkerboard`` is exact (log 32, error 0)."""
    if name == "checkerboard":
        return math.log(32.0), 0.0
    log_p = toy_log_density(name, sample_toy(name, n, generator))
    return float(-log_p.mean()), float(log_p.std() / math.sqrt(n))

r"""The true densities of the 2-D toy data sets, and their entropies: the lowest test NLL any model
can reach.

Most of the FFJORD toy sets are a distribution over a curve (or over a few points) blurred by
isotropic Gaussian noise, so their density is a one-dimensional integral

.. math:: p(x) = \int q(s)\, \mathcal{N}(x;\, c(s),\, \sigma^2 I)\, \mathrm{d}s,

evaluated here by the midpoint rule on a grid much finer than :math:`\sigma` (in float64, in log
space). ``2spirals`` adds a uniform jitter, whose convolution with the Gaussian is a product of
normal CDF differences; ``checkerboard`` is uniform on 8 squares of area 4 (entropy
:math:`\log 32` exactly). ``pinwheel`` is a smooth invertible-by-parts map of a Gaussian; its
density is a sum over the roots of a one-dimensional equation, found on a grid and refined by
Newton steps (see :func:`_pinwheel`).

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


def _pinwheel(x: Tensor, m: int = 4096, newton_steps: int = 3) -> Tensor:
    r"""Pinwheel: :math:`x = 2p`, :math:`p = R_{\mathrm{cw}}(\phi)(r, t)` with
    :math:`(r, t) \sim \mathcal{N}((1, 0), \mathrm{diag}(0.3^2, 0.1^2))`,
    :math:`\phi = 2\pi k/5 + 0.25 e^{r}` and arm :math:`k` uniform on 0..4.

    In polar coordinates :math:`(r, t) = \rho(\cos\alpha, \sin\alpha)` the rotation keeps
    :math:`\rho` and maps :math:`\alpha` to :math:`\beta = \alpha - \phi`, so a point of :math:`p`
    with polar coordinates :math:`(\rho, \beta)` comes from every :math:`\alpha` with
    :math:`u(\alpha) = \alpha - 0.25 e^{\rho\cos\alpha} - \beta \in (2\pi/5)\mathbb{Z}` (all arms
    and windings at once), and

    .. math:: p_P(p) = \sum_{\alpha} \tfrac15\, p_{r,t}(\rho\cos\alpha, \rho\sin\alpha) / |u'(\alpha)|,
              \qquad u'(\alpha) = 1 + 0.25\, e^{r}\, t,

    the Jacobian of the map from :math:`(r, t)` to :math:`p`. The roots are bracketed on ``m``
    grid intervals of :math:`[-\pi, \pi]` and refined by Newton steps."""
    p = x / 2.0
    rho = p.norm(dim=1, keepdim=True)
    beta = torch.atan2(p[:, 1:], p[:, :1])
    alpha = torch.linspace(-math.pi, math.pi, m + 1, dtype=torch.float64)[None, :]
    spacing = 2.0 * math.pi / 5.0

    def u(a: Tensor, rho_: Tensor, beta_: Tensor) -> Tensor:
        return a - 0.25 * torch.exp(rho_ * torch.cos(a)) - beta_

    level = torch.floor(u(alpha, rho, beta) / spacing)
    point, interval = torch.nonzero(level[:, 1:] != level[:, :-1], as_tuple=True)
    rho_c, beta_c = rho[point, 0], beta[point, 0]
    lo, hi = alpha[0, interval], alpha[0, interval + 1]
    target = torch.maximum(level[point, interval], level[point, interval + 1]) * spacing
    u_lo, u_hi = u(lo, rho_c, beta_c), u(hi, rho_c, beta_c)
    a = lo + (target - u_lo) / (u_hi - u_lo) * (hi - lo)  # the secant root, then Newton
    for _ in range(newton_steps):
        slope = 1.0 + 0.25 * torch.exp(rho_c * torch.cos(a)) * rho_c * torch.sin(a)
        a = torch.minimum(torch.maximum(a - (u(a, rho_c, beta_c) - target) / slope, lo), hi)
    r, t = rho_c * torch.cos(a), rho_c * torch.sin(a)
    slope = (1.0 + 0.25 * torch.exp(r) * t).abs()
    log_terms = (-math.log(5.0) - 0.5 * ((r - 1.0) / 0.3) ** 2 - 0.5 * (t / 0.1) ** 2
                 - _LOG_2PI - math.log(0.3 * 0.1) - torch.log(slope))
    peak = torch.full((x.shape[0],), -math.inf, dtype=torch.float64).scatter_reduce(0, point, log_terms, "amax")
    shift = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.zeros(x.shape[0], dtype=torch.float64).index_add_(0, point, torch.exp(log_terms - shift[point]))
    return torch.log(total) + shift - 2.0 * math.log(2.0)  # x = 2p: density / 4


_DENSITIES: Dict[str, Callable[[Tensor], Tensor]] = {
    "swissroll": _swissroll,
    "8gaussians": _eight_gaussians,
    "circles": _circles,
    "moons": _moons,
    "2spirals": _two_spirals,
    "checkerboard": _checkerboard,
    "rings": _rings,
    "pinwheel": _pinwheel,
}
#: The toy data sets whose density :func:`toy_log_density` computes (all eight).
DENSITY_DATASETS = tuple(name for name in TOY_DATASETS if name in _DENSITIES)


def toy_log_density(name: str, x: Tensor, chunk: int = 512) -> Tensor:
    """The data set's true log density at points ``x`` (n, 2), in float64 (nats)."""
    if name not in _DENSITIES:
        valid = ", ".join(DENSITY_DATASETS)
        raise ValueError(f"no density for toy data set {name!r}; available: {valid}")
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

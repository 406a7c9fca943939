r"""Seeded samplers for the paper's low-dimensional experiments.

Two families live here:

* the eight 2-D densities of the FFJORD toy set used in Table 1 / Figure 5 of the paper
  (``swissroll``, ``8gaussians``, ``pinwheel``, ``circles``, ``moons``, ``2spirals``,
  ``checkerboard``, ``rings``), each written from its mathematical description below;
* the 1-D staircase regression target of Figure 4,

  .. math::

      y = t(x+2) + t(x+1) + t(x) + t(x-1), \qquad
      t(w) = \min\bigl(\max(\max(0, a w), \min((w - (1-a))/a, 1)), 1\bigr),

  with :math:`a = 0.05` and :math:`x \sim U[-2, 2]`: four steps whose slopes alternate between
  :math:`a` and :math:`1/a`.

Every sampler draws iid points (mixture components are drawn per point) from the generator it
is given, so the same seed gives the same data. ``generator`` may be a ``torch.Generator``, a
``numpy.random.Generator`` (a torch seed is drawn from it, so consecutive calls differ but stay
reproducible), an ``int`` seed, or ``None`` (torch's global generator).

>>> x = sample_toy("moons", 4, generator=0)
>>> x.shape
torch.Size([4, 2])
>>> bool((sample_toy("moons", 4, generator=0) == x).all())
True
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TOY_DATASETS",
    "GeneratorLike",
    "as_torch_generator",
    "sample_toy",
    "swissroll",
    "eight_gaussians",
    "pinwheel",
    "circles",
    "moons",
    "two_spirals",
    "checkerboard",
    "rings",
    "staircase",
    "sample_staircase",
]

GeneratorLike = Union[torch.Generator, np.random.Generator, int, None]


def as_torch_generator(generator: GeneratorLike) -> Optional[torch.Generator]:
    """Turn any accepted generator description into a CPU ``torch.Generator`` (or ``None``).

    An ``int`` seeds a new generator; a ``numpy.random.Generator`` gives a new generator seeded by
    one draw from it; a ``torch.Generator`` is returned unchanged; ``None`` stays ``None`` (torch's
    global generator is then used by the samplers).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, np.random.Generator):
        return torch.Generator().manual_seed(int(generator.integers(0, 2**63 - 1)))
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise ValueError(
        "generator must be a torch.Generator, a numpy.random.Generator, an int seed or None; "
        f"got {type(generator).__name__}"
    )


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"number of samples must be a non-negative int, got {n!r}")
    return int(n)


def _uniform(n: int, g: Optional[torch.Generator], low: float = 0.0, high: float = 1.0) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)


def _normal(shape: Tuple[int, ...], g: Optional[torch.Generator]) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _component(n: int, k: int, g: Optional[torch.Generator]) -> Tensor:
    """Index of the mixture component of each point, uniform over ``k`` components."""
    return torch.randint(0, k, (n,), generator=g)


def swissroll(n: int, generator: GeneratorLike = None) -> Tensor:
    r"""Swiss roll seen from above.

    :math:`s = \tfrac{3\pi}{2}(1 + 2u)`, :math:`u \sim U[0,1]`;
    :math:`x = \bigl((s \cos s, s \sin s) + \varepsilon\bigr) / 5`, :math:`\varepsilon \sim N(0, I)`.
    """
    n, g = _check_n(n), as_torch_generator(generator)
    s = 1.5 * math.pi * (1.0 + 2.0 * _uniform(n, g))
    points = torch.stack([s * torch.cos(s), s * torch.sin(s)], dim=1) + _normal((n, 2), g)
    return (points / 5.0).float()


def eight_gaussians(n: int, generator: GeneratorLike = None) -> Tensor:
    r"""Eight Gaussians on a circle.

    Centres :math:`c_k = 4(\cos(k\pi/4), \sin(k\pi/4))`, :math:`k = 0..7`;
    :math:`x = (c_k + 0.5\,\varepsilon) / 1.414`.
    """
    n, g = _check_n(n), as_torch_generator(generator)
    angle = _component(n, 8, g).double() * (math.pi / 4.0)
    centres = 4.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return ((centres + 0.5 * _normal((n, 2), g)) / 1.414).float()


def pinwheel(n: int, generator: GeneratorLike = None) -> Tensor:
    r"""Five curved arms.

    Arm :math:`k \in \{0..4\}`; radial coordinate :math:`r = 1 + 0.3\,\varepsilon_1`, tangential
    :math:`t = 0.1\,\varepsilon_2`; the point :math:`(r, t)` is turned clockwise by
    :math:`\phi = 2\pi k/5 + 0.25\, e^{r}`, i.e. :math:`(r\cos\phi + t\sin\phi,\ -r\sin\phi +
    t\cos\phi)`, and scaled by 2 (the orientation of the FFJORD set).
    """
    n, g = _check_n(n), as_torch_generator(generator)
    arm = _component(n, 5, g).double()
    noise = _normal((n, 2), g)
    r = 1.0 + 0.3 * noise[:, 0]
    t = 0.1 * noise[:, 1]
    phi = 2.0 * math.pi * arm / 5.0 + 0.25 * torch.exp(r)
    cos, sin = torch.cos(phi), torch.sin(phi)
    points = torch.stack([cos * r + sin * t, cos * t - sin * r], dim=1)
    return (2.0 * points).float()


def circles(n: int, generator: GeneratorLike = None) -> Tensor:
    r"""Two concentric circles of radii 3 and 1.5.

    :math:`x = 3\,(\rho_k (\cos\theta, \sin\theta) + 0.08\,\varepsilon)`, :math:`\rho_k \in \{1, 0.5\}`,
    :math:`\theta \sim U[0, 2\pi)`.
    """
    n, g = _check_n(n), as_torch_generator(generator)
    radius = torch.tensor([1.0, 0.5], dtype=torch.float64)[_component(n, 2, g)]
    theta = _uniform(n, g, 0.0, 2.0 * math.pi)
    points = radius[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    return (3.0 * (points + 0.08 * _normal((n, 2), g))).float()


def rings(n: int, generator: GeneratorLike = None) -> Tensor:
    r"""Four concentric rings, equally likely.

    :math:`x = 3 \rho_k (\cos\theta, \sin\theta) + 0.08\,\varepsilon`,
    :math:`\rho_k \in \{0.25, 0.5, 0.75, 1\}`, :math:`\theta \sim U[0, 2\pi)` (the FFJORD set,
    which spaces the angles evenly within a batch instead of drawing them).
    """
    n, g = _check_n(n), as_torch_generator(generator)
    radius = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)[_component(n, 4, g)]
    theta = _uniform(n, g, 0.0, 2.0 * math.pi)
    points = 3.0 * radius[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    return (points + 0.08 * _normal((n, 2), g)).float()


def moons(n: int, generator: GeneratorLike = None) -> Tensor:
    r"""Two interleaving half circles.

    Upper moon :math:`(\cos\theta, \sin\theta)`, lower moon :math:`(1-\cos\theta, 0.5-\sin\theta)`,
    :math:`\theta \sim U[0, \pi]`, plus :math:`0.1\,\varepsilon`; then :math:`x \mapsto 2x + (-1, -0.2)`.
    """
    n, g = _check_n(n), as_torch_generator(generator)
    lower = _component(n, 2, g).bool()
    theta = _uniform(n, g, 0.0, math.pi)
    cos, sin = torch.cos(theta), torch.sin(theta)
    first = torch.where(lower, 1.0 - cos, cos)
    second = torch.where(lower, 0.5 - sin, sin)
    points = torch.stack([first, second], dim=1) + 0.1 * _normal((n, 2), g)
    shift = torch.tensor([-1.0, -0.2], dtype=torch.float64)
    return (2.0 * points + shift).float()


def two_spirals(n: int, generator: GeneratorLike = None) -> Tensor:
    r"""Two interleaved spirals.

    :math:`s = 3\pi\sqrt{u}` (540 degrees), :math:`p = (-s\cos s + v_1/2,\; s \sin s + v_2/2)` with
    :math:`u, v_i \sim U[0,1]`; the second spiral is :math:`-p`;
    :math:`x = \pm p / 3 + 0.1\,\varepsilon`.
    """
    n, g = _check_n(n), as_torch_generator(generator)
    sign = 1.0 - 2.0 * _component(n, 2, g).double()
    s = 3.0 * math.pi * torch.sqrt(_uniform(n, g))
    jitter = 0.5 * torch.rand(n, 2, generator=g, dtype=torch.float64)
    p = torch.stack([-torch.cos(s) * s, torch.sin(s) * s], dim=1) + jitter
    return (sign[:, None] * p / 3.0 + 0.1 * _normal((n, 2), g)).float()


def checkerboard(n: int, generator: GeneratorLike = None) -> Tensor:
    r"""Uniform density on the black squares of a 4x4 checkerboard over :math:`[-4, 4]^2`.

    :math:`x_1 \sim U[-2, 2]`; :math:`x_2 = v - 2b + (\lfloor x_1 \rfloor \bmod 2)` with
    :math:`v \sim U[0,1]`, :math:`b \in \{0,1\}`; the point is :math:`2(x_1, x_2)`.
    """
    n, g = _check_n(n), as_torch_generator(generator)
    x1 = _uniform(n, g, -2.0, 2.0)
    x2 = _uniform(n, g) - 2.0 * _component(n, 2, g).double() + torch.remainder(torch.floor(x1), 2.0)
    return (2.0 * torch.stack([x1, x2], dim=1)).float()


_SAMPLERS: Dict[str, Callable[[int, GeneratorLike], Tensor]] = {
    "swissroll": swissroll,
    "8gaussians": eight_gaussians,
    "pinwheel": pinwheel,
    "circles": circles,
    "moons": moons,
    "2spirals": two_spirals,
    "checkerboard": checkerboard,
    "rings": rings,
}

#: Names of the 2-D toy data sets, in the order of the paper's Table 1 / Figure 5.
TOY_DATASETS: Tuple[str, ...] = tuple(_SAMPLERS)


def sample_toy(name: str, n: int, generator: GeneratorLike = None) -> Tensor:
    """Draw ``n`` points of the 2-D toy data set ``name``; returns a float32 tensor ``(n, 2)``.

    Raises ``ValueError`` listing the valid names for an unknown ``name``.
    """
    try:
        sampler = _SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown toy data set {name!r}; valid names: {', '.join(TOY_DATASETS)}"
        ) from None
    return sampler(n, generator)


def staircase(x: Tensor, a: float = 0.05) -> Tensor:
    r"""The 4-step staircase of Figure 4: :math:`\sum_{c \in \{2,1,0,-1\}} t(x + c)` (see module doc).

    Non-decreasing, slopes :math:`a` and :math:`1/a`, values in ``[0, 4]`` on ``[-2, 2]``.
    """
    if not 0.0 < a < 1.0:
        raise ValueError(f"staircase slope a must lie in (0, 1), got {a}")

    def step(w: Tensor) -> Tensor:
        low = torch.clamp(a * w, min=0.0)
        steep = torch.clamp((w - (1.0 - a)) / a, max=1.0)
        return torch.clamp(torch.maximum(low, steep), max=1.0)

    return step(x + 2.0) + step(x + 1.0) + step(x) + step(x - 1.0)


def sample_staircase(
    n: int, generator: GeneratorLike = None, a: float = 0.05
) -> Tuple[Tensor, Tensor]:
    """Draw ``n`` points ``x ~ U[-2, 2]`` and their targets; returns float32 ``(x, y)``, each ``(n, 1)``."""
    n, g = _check_n(n), as_torch_generator(generator)
    # The target is computed from the float32 inputs the model sees, so y = staircase(x) holds exactly.
    x = _uniform(n, g, -2.0, 2.0)[:, None].float()
    return x, staircase(x.double(), a).float()

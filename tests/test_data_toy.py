"""The 2-D toy samplers and the 1-D staircase: shapes, seeding, and their distributions' math."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monoflow.data import TOY_DATASETS, sample_staircase, sample_toy, staircase

N = 20000


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_shape_dtype_finite(name):
    x = sample_toy(name, 257, generator=0)
    assert x.shape == (257, 2)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert sample_toy(name, 0, generator=0).shape == (0, 2)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_seeding(name):
    same_a = sample_toy(name, 100, generator=torch.Generator().manual_seed(3))
    same_b = sample_toy(name, 100, generator=torch.Generator().manual_seed(3))
    other = sample_toy(name, 100, generator=torch.Generator().manual_seed(4))
    assert torch.equal(same_a, same_b)
    assert not torch.allclose(same_a, other)
    assert torch.equal(sample_toy(name, 100, generator=3), same_a)
    numpy_a = sample_toy(name, 100, generator=np.random.default_rng(5))
    numpy_b = sample_toy(name, 100, generator=np.random.default_rng(5))
    assert torch.equal(numpy_a, numpy_b)
    # a shared generator advances: two draws differ
    generator = torch.Generator().manual_seed(9)
    assert not torch.allclose(sample_toy(name, 50, generator), sample_toy(name, 50, generator))


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid names: swissroll, 8gaussians"):
        sample_toy("moon", 10)
    with pytest.raises(ValueError, match="non-negative int"):
        sample_toy("moons", -1)
    with pytest.raises(ValueError, match="generator must be"):
        sample_toy("moons", 3, generator="seed")
    with pytest.raises(ValueError, match="slope"):
        staircase(torch.zeros(3), a=1.5)


def _squared_norm_mean(x: torch.Tensor) -> float:
    return float((x.double() ** 2).sum(dim=1).mean())


def test_second_moments_match_closed_forms():
    # swissroll: s ~ U[1.5pi, 4.5pi], E|x|^2 = (E s^2 + 2) / 25 with E s^2 = (a^2 + ab + b^2) / 3
    a, b = 1.5 * math.pi, 4.5 * math.pi
    assert _squared_norm_mean(sample_toy("swissroll", N, 1)) == pytest.approx(((a * a + a * b + b * b) / 3 + 2) / 25, rel=0.03)
    # 8 gaussians: centres of norm 4, noise std 0.5, scaled by 1/1.414
    assert _squared_norm_mean(sample_toy("8gaussians", N, 1)) == pytest.approx((16 + 2 * 0.25) / 1.414**2, rel=0.03)
    # pinwheel: |x|^2 = 4 (r^2 + t^2), r ~ N(1, 0.3^2), t ~ N(0, 0.1^2)
    assert _squared_norm_mean(sample_toy("pinwheel", N, 1)) == pytest.approx(4 * (1 + 0.09 + 0.01), rel=0.03)
    # moons: mean of both moons is (0.5, 0.25) before x -> 2x + (-1, -0.2)
    mean = sample_toy("moons", N, 1).double().mean(dim=0)
    assert torch.allclose(mean, torch.tensor([0.0, 0.3], dtype=torch.float64), atol=0.03)
    # 2spirals: the two spirals are mirror images, so the mean is 0
    assert torch.allclose(sample_toy("2spirals", N, 1).double().mean(dim=0), torch.zeros(2, dtype=torch.float64), atol=0.05)


@pytest.mark.parametrize("name, radii", [("circles", [1.5, 3.0]), ("rings", [0.75, 1.5, 2.25, 3.0])])
def test_ring_radii(name, radii):
    radius = sample_toy(name, N, 2).norm(dim=1)
    nearest = torch.tensor(radii)[(radius[:, None] - torch.tensor(radii)).abs().argmin(dim=1)]
    # noise std 0.08 (circles: 0.24 after the scaling by 3): points stay near their ring
    tolerance = 0.24 * 4 if name == "circles" else 0.08 * 4
    assert ((radius - nearest).abs() < tolerance).float().mean() > 0.99
    counts = torch.bincount((radius[:, None] - torch.tensor(radii)).abs().argmin(dim=1), minlength=len(radii))
    assert torch.allclose(counts.double() / N, torch.full((len(radii),), 1 / len(radii), dtype=torch.float64), atol=0.02)


def test_pinwheel_arms_turn_clockwise_outwards():
    # FFJORD's pinwheel: a point at radius 2r lies at angle -(2 pi k / 5 + 0.25 e^r), so
    # theta + 0.25 exp(rho / 2) is a multiple of 2 pi / 5 up to the tangential noise (0.1 / r rad)
    x = sample_toy("pinwheel", N, 4).double()
    rho, theta = x.norm(dim=1), torch.atan2(x[:, 1], x[:, 0])
    period = 2 * math.pi / 5
    residual = torch.remainder(theta + 0.25 * torch.exp(rho / 2) + period / 2, period) - period / 2
    assert residual.abs().median() < 0.1
    mirrored = torch.remainder(-theta + 0.25 * torch.exp(rho / 2) + period / 2, period) - period / 2
    assert mirrored.abs().median() > 0.2


def test_checkerboard_is_on_black_squares():
    x = sample_toy("checkerboard", N, 3).double() / 2
    assert (x.abs() <= 2).all()
    cells = torch.floor(x[:, 0]) + torch.floor(x[:, 1])
    assert (torch.remainder(cells, 2) == 0).all()
    # uniform over the 8 black cells of the 4x4 board
    index = (torch.floor(x[:, 0]) + 2) * 4 + torch.floor(x[:, 1]) + 2
    counts = torch.bincount(index.long(), minlength=16)
    assert (counts > 0).sum() == 8
    assert (counts[counts > 0].double() / N - 1 / 8).abs().max() < 0.015


def _staircase_oracle(x: float, a: float = 0.05) -> float:
    def step(w: float) -> float:
        if w < 0:
            return 0.0
        if w <= 1 / (1 + a):
            return a * w
        if w < 1:
            return (w - 1 + a) / a
        return 1.0

    return sum(step(x + c) for c in (2.0, 1.0, 0.0, -1.0))


def test_staircase_matches_piecewise_definition():
    grid = np.linspace(-2.0, 2.0, 4001)
    ours = staircase(torch.tensor(grid, dtype=torch.float64)).numpy()
    oracle = np.array([_staircase_oracle(v) for v in grid])
    assert np.allclose(ours, oracle, atol=1e-12)
    assert ours[0] == 0.0 and ours[-1] == pytest.approx(4.0)
    slopes = np.diff(ours) / np.diff(grid)
    assert (slopes >= -1e-9).all()
    assert slopes.max() == pytest.approx(20.0, rel=1e-6)
    assert slopes.min() == pytest.approx(0.05, rel=1e-6)


def test_sample_staircase():
    x, y = sample_staircase(5000, generator=7)
    assert x.shape == y.shape == (5000, 1)
    assert x.min() >= -2 and x.max() <= 2
    assert abs(float(x.mean())) < 0.06 and float(x.var()) == pytest.approx(16 / 12, rel=0.05)
    assert torch.allclose(y, staircase(x.double()).float())
    x2, y2 = sample_staircase(5000, generator=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, sample_staircase(5000, generator=8)[0])

"""The toy data sets' true densities: they integrate to one, they match the samplers box by box,
and the entropies agree with closed forms where the components barely overlap."""
import math

import pytest
import torch

from monoflow.data.toy import sample_toy
from monoflow.data.toy_density import DENSITY_DATASETS, toy_entropy, toy_log_density

HALF_WIDTH = {"swissroll": 4.0, "8gaussians": 4.5, "circles": 4.5, "moons": 4.0, "2spirals": 4.5,
              "checkerboard": 4.0, "rings": 3.84, "pinwheel": 5.6}


def _grid(name, h):
    edges = torch.arange(-HALF_WIDTH[name], HALF_WIDTH[name], h, dtype=torch.float64) + h / 2
    xx, yy = torch.meshgrid(edges, edges, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1), edges


@pytest.mark.parametrize("name", [n for n in DENSITY_DATASETS if n != "checkerboard"])
def test_density_integrates_to_one_and_matches_the_sampler(name):
    h = 0.08  # a Gaussian of std >= h sums to its integral to ~1e-8 on this grid
    points, edges = _grid(name, h)
    density = toy_log_density(name, points).exp().reshape(len(edges), len(edges))
    assert float(density.sum() * h * h) == pytest.approx(1.0, abs=5e-3)
    # probability of 16 boxes (4 x 4 blocks of the grid) against the fraction of samples in them
    n = 20000
    x = sample_toy(name, n, generator=5).double()
    blocks = 4
    size = len(edges) // blocks
    for i in range(blocks):
        for j in range(blocks):
            lo = -HALF_WIDTH[name] + h * torch.tensor([i * size, j * size], dtype=torch.float64)
            hi = lo + h * size
            mass = float(density[i * size:(i + 1) * size, j * size:(j + 1) * size].sum() * h * h)
            fraction = float(((x >= lo) & (x < hi)).all(dim=1).double().mean())
            error = math.sqrt(max(mass * (1 - mass), 1e-4) / n)
            assert abs(fraction - mass) < 5 * error + 2e-3, (name, i, j, fraction, mass)


def test_checkerboard_density_and_entropy_are_exact():
    x = sample_toy("checkerboard", 1000, generator=1)
    assert torch.allclose(toy_log_density("checkerboard", x), torch.full((1000,), -math.log(32.0), dtype=torch.float64))
    off = torch.tensor([[1.0, -1.0], [5.0, 0.0]])  # a white square and outside the board
    assert torch.isinf(toy_log_density("checkerboard", off)).all()
    assert toy_entropy("checkerboard") == (math.log(32.0), 0.0)


def test_entropies_of_well_separated_mixtures():
    # 8 gaussians barely overlap: H = log 8 + log(2 pi e sigma^2), sigma = 0.5 / 1.414
    sigma = 0.5 / 1.414
    value, error = toy_entropy("8gaussians", n=20000)
    assert value == pytest.approx(math.log(8) + math.log(2 * math.pi * math.e * sigma**2), abs=4 * error + 1e-3)
    # thin rings: H ~ log(4) + E log(2 pi r) + entropy of the radial N(0, 0.08^2) (to ~1e-2)
    radii = [0.75, 1.5, 2.25, 3.0]
    approximate = math.log(4) + sum(math.log(2 * math.pi * r) for r in radii) / 4 + 0.5 * math.log(2 * math.pi * math.e * 0.08**2)
    assert toy_entropy("rings", n=20000)[0] == pytest.approx(approximate, abs=0.03)


def test_pinwheel_density_is_the_change_of_variables_of_its_gaussian():
    """Oracle: push (r, t) forward through one arm's map and divide the Gaussian density by the
    autograd Jacobian determinant. Near an arm's centre line the other arms and windings add
    less than 1e-5 of the density, so the root-finding density must agree to that."""
    generator = torch.Generator().manual_seed(0)
    r = 1.0 + 0.15 * torch.randn(50, generator=generator, dtype=torch.float64)
    t = 0.05 * torch.randn(50, generator=generator, dtype=torch.float64)

    def arm(rt):
        phi = 0.25 * torch.exp(rt[0])
        cos, sin = torch.cos(phi), torch.sin(phi)
        return 2.0 * torch.stack([cos * rt[0] + sin * rt[1], cos * rt[1] - sin * rt[0]])

    for r_i, t_i in zip(r, t):
        rt = torch.stack([r_i, t_i])
        x = arm(rt)
        det = torch.linalg.det(torch.autograd.functional.jacobian(arm, rt))
        log_gaussian = (-0.5 * ((r_i - 1) / 0.3) ** 2 - 0.5 * (t_i / 0.1) ** 2 - math.log(2 * math.pi * 0.03))
        expected = log_gaussian - math.log(5.0) - torch.log(det.abs())
        assert float(toy_log_density("pinwheel", x[None])[0]) == pytest.approx(float(expected), abs=1e-5)


def test_density_errors():
    with pytest.raises(ValueError, match="no density for toy data set 'spiral'; available: swissroll"):
        toy_log_density("spiral", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="shape"):
        toy_log_density("rings", torch.zeros(3, 3))

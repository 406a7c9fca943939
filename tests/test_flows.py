"""Flows built by the model builders: parameter counts, densities that integrate to one, round
trips, sampling, gradients."""
import pytest
import torch

from monoflow.flows import Flow
from monoflow.lipschitz import certify_lipschitz, set_learnable_concat, update_lipschitz
from monoflow.models import regression_flow, toy_flow


@pytest.mark.parametrize("kind,count", [("monotone", 5640), ("idensenet", 5670), ("resflow", 5600)])
def test_toy_flow_parameter_counts(kind, count):
    assert sum(p.numel() for p in toy_flow(kind).parameters()) == count


@pytest.mark.parametrize("kind,count", [("residual", 100372), ("residual_actnorm", 100378),
                                        ("implicit_actnorm", 100376), ("monotone_actnorm", 100378)])
def test_regression_flow_parameter_counts(kind, count):
    assert sum(p.numel() for p in regression_flow(kind).parameters()) == count


@pytest.mark.parametrize("kind", ["monotone", "idensenet", "resflow"])
def test_toy_density_integrates_to_one(kind):
    flow = toy_flow(kind, nblocks=3, depth=2, growth=8)
    with torch.no_grad():  # make the map far from the identity
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    update_lipschitz(flow, tol=1e-7, max_iterations=1000)
    edge = torch.linspace(-12, 12, 481)
    xx, yy = torch.meshgrid(edge, edge, indexing="ij")
    grid = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    with torch.no_grad():
        density = flow.log_prob(grid).exp()
    cell = (edge[1] - edge[0]) ** 2
    assert abs(float(density.sum() * cell) - 1.0) < 0.01


@pytest.mark.parametrize("kind", ["monotone", "idensenet", "resflow"])
def test_toy_flow_round_trip_sampling_and_certificate(kind):
    flow = toy_flow(kind, nblocks=2)
    x = torch.randn(64, 2) * 2
    z, logdet = flow(x)
    x_back, inverse_logdet = flow.inverse(z)
    assert torch.allclose(x_back, x, atol=1e-4)
    assert torch.allclose(logdet, -inverse_logdet, atol=1e-4)
    samples = flow.sample(10, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (10, 2) and torch.isfinite(samples).all()
    certificates = certify_lipschitz(flow)
    assert len(certificates) == 2 and all(c.holds for c in certificates)


@pytest.mark.parametrize("kind", ["monotone", "idensenet", "resflow"])
def test_every_toy_parameter_gets_a_gradient(kind):
    flow = toy_flow(kind, nblocks=2)
    set_learnable_concat(flow, True)
    (-flow.log_prob(torch.randn(32, 2)).mean()).backward()
    missing = [n for n, p in flow.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("kind", ["residual", "residual_actnorm", "implicit_actnorm", "monotone_actnorm"])
def test_regression_flows_fit_step(kind):
    flow = regression_flow(kind, depth=2, growth=16)
    x = torch.rand(128, 1) * 4 - 2
    y, logdet = flow(x)
    assert logdet is None and y.shape == (128, 1)
    ((y - x.clamp(-1, 1)) ** 2).mean().backward()
    assert all(p.grad is not None for n, p in flow.named_parameters() if not n.endswith(("K1", "K2")))
    with torch.no_grad():
        assert torch.allclose(flow.inverse(y)[0], x, atol=1e-4)


def test_flow_errors():
    flow = toy_flow("monotone", nblocks=1)
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        flow(torch.randn(4, 3))
    with pytest.raises(ValueError, match="at least one block"):
        Flow([])
    with pytest.raises(ValueError, match="unknown toy flow kind"):
        toy_flow("glow")
    with pytest.raises(RuntimeError, match="no log-determinant"):
        regression_flow("residual", depth=1, growth=4).log_prob(torch.randn(3, 1))

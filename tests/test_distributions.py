"""The distribution face of a Flow and the torch.distributions Transform adapter, each checked
against an independent computation: the block interface itself, finite differences
(gradcheck) and slogdet of the autograd Jacobian."""
import pytest
import torch
from torch.distributions import Independent, Normal, TransformedDistribution

from monoflow.blocks import ActNorm, ImplicitBlock, MonotoneBlock, ResidualBlock
from monoflow.distributions import BlockTransform
from monoflow.lipschitz import dense_mlp, update_lipschitz
from monoflow.models import toy_flow
from monoflow.solvers import SolverOptions

TIGHT = SolverOptions(atol=1e-12, rtol=1e-12, max_iterations=500)


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _flow(kind="monotone", dtype=torch.float64):
    """A small 2-D flow far from the identity, with tight solves in float64."""
    torch.manual_seed(0)
    solver = TIGHT if dtype == torch.float64 else None
    flow = toy_flow(kind, nblocks=2, depth=1, growth=4, solver=solver).to(dtype)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    update_lipschitz(flow, tol=1e-10, max_iterations=1000)
    return flow


def _g(seed):
    torch.manual_seed(seed)
    g = dense_mlp(2, 1, 4, "cpila", coeff=0.9).double()
    update_lipschitz(g, tol=1e-10, max_iterations=1000)
    return g


def _blocks():
    actnorm = ActNorm(2).double()
    actnorm(torch.randn(16, 2, dtype=torch.float64) * 3 + 1)  # data-dependent initialisation
    return {
        "monotone": MonotoneBlock(_g(1), solver=TIGHT),
        "residual": ResidualBlock(_g(2), solver=TIGHT),
        "implicit": ImplicitBlock(_g(3), _g(4), solver=TIGHT),
        "actnorm": actnorm,
    }


def test_sample_takes_a_shape_and_the_int_keeps_its_meaning():
    flow = _flow(dtype=torch.float32)
    assert flow.sample().shape == (2,)
    assert flow.sample(4).shape == (4, 2)
    assert flow.sample((2, 3)).shape == flow.sample(torch.Size([2, 3])).shape == (2, 3, 2)
    assert flow.sample(0).shape == (0, 2)
    # the draw is the inverse of the same base draw as before the shapes: sample(n) is unchanged
    x = flow.sample(5, generator=_generator())
    with torch.no_grad():
        expected, _ = flow.inverse(torch.randn(5, 2, generator=_generator()), with_logdet=False)
    assert torch.equal(x, expected)
    assert torch.equal(flow.sample((5, 1), generator=_generator()), expected.reshape(5, 1, 2))


@pytest.mark.parametrize("size", [2.5, "3", (2, 1.0), True, None, torch.tensor(2.0)])
def test_sample_refuses_a_non_integer_size(size):
    flow = _flow(dtype=torch.float32)
    with pytest.raises(TypeError, match="sample_shape must be an int or a sequence of ints"):
        flow.sample(size)


def test_sample_refuses_a_negative_size():
    with pytest.raises(ValueError, match=">= 0"):
        _flow(dtype=torch.float32).rsample((2, -1))


def test_log_prob_takes_any_sample_shape():
    flow = _flow()
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    with torch.no_grad():
        flat = flow.log_prob(x.reshape(15, 2))
        assert torch.allclose(flow.log_prob(x), flat.reshape(3, 5), rtol=0, atol=1e-12)
        assert flow.log_prob(x[0, 0]).shape == ()
        assert torch.allclose(flow.log_prob(x[0, 0]), flat[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["monotone", "idensenet"])
def test_sample_and_log_prob_equals_sample_then_log_prob(kind):
    flow = _flow(kind)
    x, log_prob = flow.sample_and_log_prob((4, 3), generator=_generator(1))
    assert x.shape == (4, 3, 2) and log_prob.shape == (4, 3)
    assert torch.allclose(x, flow.sample((4, 3), generator=_generator(1)), rtol=0, atol=1e-10)
    with torch.no_grad():
        assert torch.allclose(log_prob, flow.log_prob(x), rtol=0, atol=1e-8)
    assert not x.requires_grad and not log_prob.requires_grad
    x, log_prob = flow.rsample_and_log_prob(6, generator=_generator(2))
    assert x.requires_grad and log_prob.requires_grad


@pytest.mark.parametrize("kind", ["monotone", "idensenet"])
def test_rsample_gradient_passes_gradcheck(kind):
    """Gradients of rsample with respect to the parameters, through the inverse solves, against
    finite differences."""
    flow = _flow(kind)
    names = [name for name, _ in flow.named_parameters()]

    def draw(*parameters):
        return _rsample_with(flow, dict(zip(names, parameters)))

    parameters = tuple(p.detach().clone().requires_grad_(True) for p in flow.parameters())
    assert torch.autograd.gradcheck(draw, parameters, eps=1e-6, atol=1e-6, rtol=1e-4)
    assert not flow.sample(3).requires_grad


def _rsample_with(flow, values):
    """flow.rsample(3) with the parameters replaced by ``values`` (tensors gradcheck perturbs)."""
    # gradcheck perturbs through .data, which does not bump the version counters that key the
    # no-grad caches of normalised weights and activation constants: start each draw without them
    for module in flow.modules():
        for cache in ("_normalized_cache", "_eta_cache", "_scaled_weight_cache", "_sign_cache"):
            module.__dict__.pop(cache, None)

    class Sampler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = flow

        def forward(self):
            return self.flow.rsample(3, generator=_generator(3))

    return torch.func.functional_call(Sampler(), {f"flow.{k}": v for k, v in values.items()}, ())


@pytest.mark.parametrize("kind", ["monotone", "idensenet", "resflow"])
def test_transformed_distribution_log_prob_equals_flow_log_prob(kind):
    flow = _flow(kind)
    x = 2 * torch.randn(7, 2, dtype=torch.float64)
    with torch.no_grad():
        expected = flow.log_prob(x)
        assert torch.allclose(flow.distribution().log_prob(x), expected, rtol=0, atol=1e-10)
        # the same distribution composed block by block from the adapter
        base = Independent(Normal(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)), 1)
        composed = TransformedDistribution(base, [BlockTransform(b).inv for b in reversed(flow.blocks)])
        assert torch.allclose(composed.log_prob(x), expected, rtol=0, atol=1e-10)
        assert torch.allclose(composed.log_prob(x.reshape(7, 1, 2)), expected.reshape(7, 1), rtol=0, atol=1e-10)
    sample = flow.distribution().rsample((2, 3))
    assert sample.shape == (2, 3, 2) and sample.requires_grad


@pytest.mark.parametrize("name", ["monotone", "residual", "implicit", "actnorm"])
def test_transform_log_abs_det_jacobian_is_the_slogdet_of_the_jacobian(name):
    block = _blocks()[name]
    transform = BlockTransform(block)
    x = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        y = transform(x)
        ladj = transform.log_abs_det_jacobian(x, y)  # the log-det kept from the call
        recomputed = transform.log_abs_det_jacobian(x.clone(), y.clone())
    expected = torch.stack([
        torch.linalg.slogdet(torch.autograd.functional.jacobian(lambda v: block(v[None])[0][0], row))[1]
        for row in x
    ])
    assert torch.allclose(ladj, expected, rtol=0, atol=1e-8)
    assert torch.allclose(recomputed, expected, rtol=0, atol=1e-8)
    with torch.no_grad():
        assert torch.allclose(transform.inv(y), x, rtol=0, atol=1e-9)
        assert torch.allclose(transform.inv.log_abs_det_jacobian(y, x), -expected, rtol=0, atol=1e-8)


def test_transform_handles_image_events_and_refuses_bad_arguments():
    actnorm = ActNorm(3)
    actnorm(torch.randn(8, 3, 4, 4))
    transform = BlockTransform(actnorm, event_dim=3)
    x = torch.randn(2, 5, 3, 4, 4)
    assert transform(x).shape == x.shape
    assert transform.log_abs_det_jacobian(x, transform(x)).shape == (2, 5)
    assert transform.with_cache(1)(x) is not None and transform.with_cache(0) is transform
    with pytest.raises(ValueError, match="event_dim"):
        BlockTransform(actnorm, event_dim=0)
    with pytest.raises(TypeError, match="inverse"):
        BlockTransform(torch.nn.Linear(2, 2))

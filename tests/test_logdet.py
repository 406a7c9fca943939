"""Log-det estimators: series coefficients, unbiasedness of Russian roulette, Neumann gradients,
memory-efficient mode, against exact values from slogdet."""
import math

import pytest
import torch

from monoflow.blocks import MonotoneBlock, ResidualBlock
from monoflow.lipschitz import dense_convnet, dense_mlp, set_learnable_concat
from monoflow.logdet import (
    CAYLEY,
    RESIDUAL,
    ExactLogDet,
    PowerSeriesLogDet,
    RussianRouletteLogDet,
    make_estimator,
)


def _g(dim=3, coeff=0.7):
    g = dense_mlp(dim, 1, 4, "cpila", coeff=coeff, lip_coeff=0.98)
    set_learnable_concat(g, True)
    return g


def _exact(g, w, series):
    return ExactLogDet()(g, w, series, training=False)


def test_series_coefficients():
    assert [CAYLEY.coefficient(k) for k in range(1, 6)] == [-2.0, 0.0, -2.0 / 3, 0.0, -2.0 / 5]
    assert [RESIDUAL.coefficient(k) for k in range(1, 4)] == [1.0, -0.5, 1.0 / 3]
    assert CAYLEY.negated().coefficient(3) == 2.0 / 3
    # only odd powers: the Neumann gradient weights J^0, J^2, ... by -2
    assert [CAYLEY.neumann_coefficient(j) for j in range(4)] == [-2.0, 0.0, -2.0, 0.0]


@pytest.mark.parametrize("series", [CAYLEY, RESIDUAL], ids=["cayley", "residual"])
def test_series_sums_to_exact_formula(series, float64):
    J = 0.6 * torch.randn(5, 4, 4) / 4
    total = sum(series.coefficient(k) * torch.diagonal(torch.linalg.matrix_power(J, k), dim1=1, dim2=2).sum(-1)
                for k in range(1, 80))
    assert torch.allclose(total, series.exact(J), atol=1e-10)


def _replicated_estimates(estimator, g, w, series, calls):
    means = []
    for _ in range(calls):
        means.append(estimator(g, w, series, training=True).detach().mean())
    return torch.stack(means)


@pytest.mark.parametrize("series", [CAYLEY, RESIDUAL], ids=["cayley", "residual"])
@pytest.mark.parametrize("distribution", ["geometric", "poisson"])
def test_russian_roulette_is_unbiased(series, distribution, float64):
    g = _g()
    w = torch.randn(1, 3).expand(64, 3).contiguous()
    exact = _exact(g, w[:1], series)[0]
    estimator = RussianRouletteLogDet(distribution=distribution, n_exact_terms=1, p=0.5, lam=1.0)
    draws = _replicated_estimates(estimator, g, w, series, 300)
    stderr = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - exact) < 4 * stderr + 1e-3


def test_power_series_converges_to_exact(float64):
    g = _g(coeff=0.5)
    w = torch.randn(1, 3).expand(256, 3).contiguous()
    exact = _exact(g, w[:1], CAYLEY)[0]
    draws = _replicated_estimates(PowerSeriesLogDet(n_terms=15, probe="rademacher"), g, w, CAYLEY, 40)
    assert abs(draws.mean() - exact) < 4 * draws.std() / math.sqrt(40) + 1e-3


def _param_grad(g, estimate):
    params = [p for p in g.parameters()]
    grads = torch.autograd.grad(estimate.sum(), params, allow_unused=True)
    return torch.cat([torch.zeros_like(p).flatten() if gr is None else gr.flatten() for p, gr in zip(params, grads)])


@pytest.mark.parametrize("series", [CAYLEY, RESIDUAL], ids=["cayley", "residual"])
def test_neumann_gradient_mean_matches_exact_gradient(series, float64):
    g = _g()
    w = torch.randn(1, 3)
    exact_grad = _param_grad(g, _exact(g, w, series))
    estimator = RussianRouletteLogDet(n_exact_terms=2, gradient="neumann")
    batch = w.expand(64, 3).contiguous()
    draws = torch.stack([_param_grad(g, estimator(g, batch, series, training=True)) / 64 for _ in range(150)])
    stderr = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - exact_grad).abs() <= 4 * stderr + 2e-3).all()


def test_neumann_value_is_the_unbiased_estimate_not_the_surrogate(float64):
    g = _g()
    w = torch.randn(1, 3).expand(64, 3).contiguous()
    exact = _exact(g, w[:1], CAYLEY)[0]
    estimator = RussianRouletteLogDet(n_exact_terms=2, gradient="neumann")
    draws = _replicated_estimates(estimator, g, w, CAYLEY, 200)
    assert abs(draws.mean() - exact) < 4 * draws.std() / math.sqrt(200) + 1e-3


@pytest.mark.parametrize("gradient", ["backprop", "neumann"])
def test_memory_efficient_mode_gives_the_same_gradients(gradient, float64):
    x = torch.randn(8, 3)
    grads = []
    for memory_efficient in (False, True):
        torch.manual_seed(1)
        g = _g()
        estimator = RussianRouletteLogDet(n_exact_terms=3, gradient=gradient, memory_efficient=memory_efficient)
        estimator.generator = torch.Generator().manual_seed(5)
        block = MonotoneBlock(g, logdet=estimator)
        xx = x.clone().requires_grad_()
        y, logdet = block(xx)
        (y.square().sum() + logdet.mean()).backward()
        grads.append(torch.cat([xx.grad.flatten()] + [p.grad.flatten() for p in g.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-10)


def test_memory_efficient_mode_rejects_unequal_sample_weights():
    estimator = RussianRouletteLogDet(memory_efficient=True)
    block = ResidualBlock(_g(), logdet=estimator)
    _, logdet = block(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="equally"):
        (logdet * torch.arange(4.0)).sum().backward()


def test_stochastic_estimators_work_on_images(float64):
    g = dense_convnet(1, 1, 4, "cpila", coeff=0.6, lip_coeff=0.98)
    x = torch.randn(1, 1, 3, 3)
    g(x)  # fixes the input size of the convolutions
    block = MonotoneBlock(g, logdet=RussianRouletteLogDet(n_exact_terms=4))
    flat = lambda z: block(z.reshape(1, 1, 3, 3))[0].flatten()  # noqa: E731
    exact = torch.linalg.slogdet(torch.autograd.functional.jacobian(flat, x.flatten()))[1]
    batch = x.expand(64, 1, 3, 3).contiguous()
    draws = torch.stack([block(batch)[1].detach().mean() for _ in range(100)])
    assert abs(draws.mean() - exact) < 4 * draws.std() / 10 + 1e-3
    with pytest.raises(ValueError, match="exact"):
        MonotoneBlock(g, logdet="exact")(x)


def test_exact_log_det_without_autograd(float64):
    g = _g()
    block = MonotoneBlock(g)
    x = torch.randn(5, 3)
    with torch.no_grad():
        _, logdet = block(x)
    assert torch.allclose(logdet, block(x)[1].detach())


def test_make_estimator_names():
    assert isinstance(make_estimator("exact"), ExactLogDet)
    assert make_estimator("neumann").gradient == "neumann"
    assert make_estimator(None) is None
    with pytest.raises(ValueError, match="unknown log-det estimator"):
        make_estimator("trace")
    with pytest.raises(ValueError, match="distribution"):
        RussianRouletteLogDet(distribution="binomial")


@pytest.mark.parametrize("with_jacobian", [True, False])
def test_value_and_logdet_matches_separate_calls(with_jacobian):
    # residual blocks take g(w) and the log-det from one Jacobian pass when g propagates
    # Jacobians; value, log-det and parameter gradients must equal the two separate calls
    torch.manual_seed(1)
    g = _g().double()
    if not with_jacobian:
        g = torch.nn.Sequential(*g.layers)  # the same network without DenseNet.jacobian
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    value, logdet = ExactLogDet().value_and_logdet(g, w, RESIDUAL, training=True)
    fused = torch.autograd.grad((value.sum() + logdet.sum()), [w] + list(g.parameters()))
    separate_value, separate_logdet = g(w), ExactLogDet()(g, w, RESIDUAL, training=True)
    separate = torch.autograd.grad((separate_value.sum() + separate_logdet.sum()), [w] + list(g.parameters()))
    assert torch.allclose(value, separate_value, atol=1e-12)
    assert torch.allclose(logdet, separate_logdet, atol=1e-12)
    for a, b in zip(fused, separate):
        assert torch.allclose(a, b, atol=1e-10)
    J = torch.autograd.functional.jacobian(lambda x: g(x).sum(0), w.detach()).transpose(0, 1)
    assert torch.allclose(logdet, torch.linalg.slogdet(torch.eye(3, dtype=torch.float64) + J)[1], atol=1e-10)

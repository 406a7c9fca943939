"""The flat DenseNet on feature buffers (monoflow.lipschitz.dense_buffered) and the scalar solve whose
first evaluation is the graph evaluation (monoflow.implicit): values, Jacobians and gradients against
plain autograd, float64."""
from contextlib import contextmanager

import pytest
import torch

from monoflow import kernels
from monoflow.implicit import solve_resolvent
from monoflow.lipschitz import dense_mlp, set_learnable_concat
from monoflow.lipschitz.dense_buffered import _BufferedDense, buffered_applicable
from monoflow.lipschitz.dense_fused import pack_parameters, plain_dense
from monoflow.solvers import SolverOptions

ACTIVATIONS = ["crelu", "cpila", "pila"]


def _network(activation, dim, depth=3, growth=16, seed=0):
    """A flat g with learned, unequal concatenation scales, float64."""
    torch.manual_seed(seed)
    g = dense_mlp(dim, depth, growth, activation, 0.9, 0.98).double()
    set_learnable_concat(g, True)
    with torch.no_grad():
        for index, layer in enumerate(g.layers[:-1]):
            layer.K1.fill_(0.3 + index)
            layer.K2.fill_(1.7 - index)
    return g


def _inputs(rows, dim, seed=1):
    return torch.randn(rows, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2.0


@contextmanager
def _plain(g):
    """Neither the fused kernels nor the feature buffers: g in plain autograd operators."""
    g._buffered_supported = False
    try:
        with kernels.enabled(False):
            yield
    finally:
        g._buffered_supported = True


def test_applies_to_flat_networks_of_parameter_free_activations():
    assert buffered_applicable(_network("crelu", 1), _inputs(3, 1))
    assert not buffered_applicable(_network("clipswish", 2), _inputs(3, 2))  # a learnable beta
    assert not buffered_applicable(_network("crelu", 2), _inputs(3, 1))  # the wrong width
    assert not buffered_applicable(_network("crelu", 2), _inputs(3, 2).float())  # the wrong dtype


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("rows", [1, 7])
def test_value_and_jacobian_match_plain_operators_and_autograd(activation, dim, rows):
    g = _network(activation, dim)
    x = _inputs(rows, dim)
    params, _, act, _ = pack_parameters(g, g._scaled_weights(dim))
    with torch.no_grad():
        value, jac = _BufferedDense.apply(x, params, act, g, True)
        plain_value, plain_jac = plain_dense(g, x, params, act, True)
    torch.testing.assert_close(value, plain_value, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(jac, plain_jac, rtol=1e-12, atol=1e-13)
    with _plain(g):
        for row in range(rows):
            expected = torch.autograd.functional.jacobian(lambda v: g(v.unsqueeze(0)).squeeze(0), x[row])
            torch.testing.assert_close(jac[row], expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_jacobian", [False, True])
def test_function_passes_gradcheck_and_gradgradcheck(activation, with_jacobian):
    """The value's own backward, and where a gradient reaches the Jacobian or the backward is recorded,
    the plain operators' (CReLU's second derivative is zero almost everywhere: gradgradcheck holds)."""
    g = _network(activation, 2, depth=2, growth=6)
    params, _, act, _ = pack_parameters(g, g._scaled_weights(2))
    x = _inputs(5, 2).requires_grad_(True)
    params = params.detach().requires_grad_(True)

    def function(x, params):
        return _BufferedDense.apply(x, params, act, g, with_jacobian)

    assert torch.autograd.gradcheck(function, (x, params))
    assert torch.autograd.gradgradcheck(function, (x, params))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_parameter_gradient_matches_plain_autograd(activation):
    """A loss of g at an input without grad (the buffered forward) and of the one-pass value and
    Jacobian: the gradients of every parameter (weights, biases, the concatenation scales K) equal plain
    autograd's, and none is missing."""
    g = _network(activation, 1)
    x = _inputs(40, 1)
    parameters = [p for p in g.parameters() if p.requires_grad]

    def loss_gradients(one_pass):
        value = g(x)
        if one_pass:
            at, jac = g.value_and_detached_jacobian(x)
            assert not jac.requires_grad
        else:
            z = x.clone().requires_grad_(True)
            at = g(z)
            (slope,) = torch.autograd.grad(at, z, torch.ones_like(at), retain_graph=True)
            jac = slope.unsqueeze(-1)
        loss = value.sin().sum() + (at * (1.0 + jac[:, :, 0].detach())).square().sum()
        return torch.autograd.grad(loss, parameters)

    buffered = loss_gradients(True)
    with _plain(g):
        assert g.value_and_detached_jacobian(x) is None
        plain = loss_gradients(False)
    for mine, theirs in zip(buffered, plain):
        assert bool(mine.abs().sum() > 0)
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


def _solve_gradients(g, b, sign, forward, adjoint):
    """The solution and the gradients in b and every parameter of a loss of it."""
    b = b.clone().requires_grad_(True)
    parameters = [p for p in g.parameters() if p.requires_grad]
    z = solve_resolvent(g, b, sign, forward, adjoint, jacobian_at_solution=True)
    grads = torch.autograd.grad((z.sin() * torch.arange(1, len(b) + 1, dtype=b.dtype)[:, None]).sum(), [b, *parameters])
    return z.detach(), grads


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("tolerance", [1e-10, 1e-14])
def test_scalar_solve_graph_from_its_first_evaluation_has_the_implicit_gradients(sign, tolerance):
    """The scalar solve's first evaluation, with its graph and Jacobian, is the graph evaluation of the
    samples converged there; the others are evaluated again at their solution (a tight tolerance makes
    many iterate further). The solution equals the plain solve's, the gradients those of the iterative
    adjoint through plain autograd (the implicit function theorem's, an independent path)."""
    g = _network("crelu", 1, depth=4, growth=32)
    b = _inputs(300, 1)
    forward = SolverOptions(method="scalar", atol=tolerance, rtol=tolerance, table_points=64, max_iterations=200)
    calls = []
    original = g.value_and_detached_jacobian

    def counted(w):
        calls.append(w.shape[0])
        return original(w)

    g.value_and_detached_jacobian = counted
    try:
        z, grads = _solve_gradients(g, b, sign, forward, SolverOptions(method="direct"))
    finally:
        del g.value_and_detached_jacobian
    with _plain(g):
        plain_z, plain_grads = _solve_gradients(g, b, sign, forward, SolverOptions(atol=0.0, rtol=1e-13, max_iterations=200))
    assert calls[0] == len(b) and (len(calls) == 1 or calls[1] < len(b))  # no evaluation of the whole batch again
    torch.testing.assert_close(z, plain_z, rtol=0.0, atol=10 * tolerance)
    assert torch.isclose(z + sign * g(z), b, rtol=0.0, atol=10 * tolerance).all()
    for mine, theirs in zip(grads, plain_grads):
        assert bool(mine.abs().sum() > 0)
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-8)

"""The flat DenseNet in one fused kernel (monoflow.lipschitz.dense_fused): values, Jacobians, gradients
and Newton steps against the plain operators and autograd."""
import pytest
import torch

from monoflow import kernels
from monoflow.implicit import newton_start
from monoflow.lipschitz import dense_mlp, set_learnable_concat
from monoflow.lipschitz.dense_fused import _FusedDense, fused_applicable, pack_parameters, plain_dense

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"fused kernels: {kernels.status()['reason']}")

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def _network(activation, dtype, dim=2, seed=0):
    """The toy models' g (depth 3, growth 16) with learned, unequal concatenation scales."""
    torch.manual_seed(seed)
    g = dense_mlp(dim, 3, 16, activation, 0.9, 0.98).to(dtype)
    set_learnable_concat(g, True)
    with torch.no_grad():
        for index, layer in enumerate(g.layers[:-1]):
            layer.K1.fill_(0.3 + index)
            layer.K2.fill_(1.7 - index)
            if activation == "clipswish":
                layer.activation.b.fill_(0.2 + 0.5 * index)
    return g


def _inputs(rows, dim, dtype, seed=1):
    return torch.randn(rows, dim, dtype=dtype, generator=torch.Generator().manual_seed(seed)) * 2.0


@needs_kernels
@pytest.mark.parametrize("activation", ["cpila", "clipswish"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 63, 64, 130])
def test_fused_value_and_jacobian_match_plain_operators(activation, dtype, rows):
    """Whole row blocks and partial ones, without autograd."""
    g = _network(activation, dtype)
    x = _inputs(rows, 2, dtype)
    assert fused_applicable(g, x)
    with torch.no_grad():
        fused = (g(x), *g.jacobian(x))
        with kernels.enabled(False):
            plain = (g(x), *g.jacobian(x))
    for mine, theirs in zip(fused, plain):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, **TOLERANCES[dtype])


@needs_kernels
@pytest.mark.parametrize("activation", ["cpila", "clipswish"])
def test_fused_jacobian_matches_autograd_jacobian(activation):
    """The kernel's forward-propagated Jacobian against autograd's, sample by sample, float64."""
    g = _network(activation, torch.float64)
    x = _inputs(5, 2, torch.float64)
    _, jac = g.jacobian(x)
    with kernels.enabled(False):
        for row in range(x.shape[0]):
            expected = torch.autograd.functional.jacobian(lambda v: g(v.unsqueeze(0)).squeeze(0), x[row])
            torch.testing.assert_close(jac[row], expected, rtol=1e-12, atol=1e-13)


@needs_kernels
@pytest.mark.parametrize("activation", ["cpila", "clipswish"])
@pytest.mark.parametrize("with_jacobian", [False, True])
def test_fused_function_passes_gradcheck_and_gradgradcheck(activation, with_jacobian):
    """In x, the packed parameters and each CLipSwish beta; the double backward runs plain_dense."""
    g = _network(activation, torch.float64)
    params, hidden, act, kind = pack_parameters(g, g._scaled_weights(2))
    constants = act.detach()[:, 1:]
    x = _inputs(7, 2, torch.float64).requires_grad_(True)
    params = params.detach().requires_grad_(True)
    beta = act.detach()[:, :1].clone().requires_grad_(activation == "clipswish")

    def function(x, params, beta):
        return _FusedDense.apply(x, params, torch.cat([beta, constants], 1), g, hidden, kind, with_jacobian)

    assert torch.autograd.gradcheck(function, (x, params, beta))
    assert torch.autograd.gradgradcheck(function, (x, params, beta))


@needs_kernels
@pytest.mark.parametrize("activation", ["cpila", "clipswish"])
def test_gradients_of_every_parameter_match_plain_autograd(activation):
    """A loss of g and its Jacobian: the gradients of x and of every parameter (weights, biases, the
    concatenation scales K, beta) equal those of the plain operators, and none is missing."""
    g = _network(activation, torch.float64)
    x = _inputs(90, 2, torch.float64).requires_grad_(True)

    def gradients():
        value = g(x)
        value_at_jacobian, jac = g.jacobian(x)
        loss = (value.sin().sum() + torch.logdet(torch.eye(2, dtype=x.dtype) + jac).sum()
                + value_at_jacobian.square().sum())
        parameters = [p for p in g.parameters() if p.requires_grad]
        return torch.autograd.grad(loss, [x, *parameters])

    fused = gradients()
    with kernels.enabled(False):
        plain = gradients()
    for mine, theirs in zip(fused, plain):
        assert mine is not None and bool(mine.abs().sum() > 0)
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("activation", ["cpila", "clipswish"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [1, 2])
def test_fused_newton_steps_match_plain_newton_steps(activation, dtype, dim):
    g = _network(activation, dtype, dim=dim)
    b = _inputs(100, dim, dtype)
    with torch.no_grad():
        for sign in (1.0, -1.0):
            fused = g.fused_newton(b, sign, 3)
            assert fused is not None
            with kernels.enabled(False):
                assert g.fused_newton(b, sign, 3) is None
                plain = newton_start(g, b, sign, 3)
            torch.testing.assert_close(fused, plain, **TOLERANCES[dtype])
            residual = fused + sign * g(fused) - b
            assert float(residual.abs().max()) < (1e-4 if dtype == torch.float32 else 1e-10)


@needs_kernels
def test_large_batches_split_over_threads_give_the_same_results(one_and_three_threads):
    """Batches above DENSE_PARALLEL_ROWS run in row blocks on several threads, with private
    gradient accumulators: the same numbers as one thread (a small threshold, an odd batch)."""
    g = _network("clipswish", torch.float64)
    x = _inputs(301, 2, torch.float64).requires_grad_(True)

    def results():
        value, jac = g.jacobian(x)
        loss = value.sin().sum() + jac.cos().sum()
        with torch.no_grad():
            newton = g.fused_newton(x.detach(), -1.0, 2)
        return [value, jac, newton, *torch.autograd.grad(loss, [x, *g.parameters()])]

    single, split = one_and_three_threads(results, kernels, "DENSE_PARALLEL_ROWS", 64)
    for a, b in zip(single, split):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


def test_unsupported_networks_and_inputs_use_the_plain_operators():
    """Other activations, images, half precision and the switch: not applicable, and g still computes."""
    x = _inputs(10, 2, torch.float64)
    assert not fused_applicable(dense_mlp(2, 2, 8, "lipswish", 0.9, 0.98).double(), x)
    assert not fused_applicable(dense_mlp(2, 2, 8, "crelu", 0.9, 0.98).double(), x)
    g = _network("cpila", torch.float64)
    assert not fused_applicable(g, x.float())
    assert not fused_applicable(g, x[:, :1])
    with kernels.enabled(False):
        assert not fused_applicable(g, x)
        assert g.fused_newton(x, 1.0, 2) is None
    g3 = _network("cpila", torch.float64, dim=3)
    with torch.no_grad():
        assert g3.fused_newton(_inputs(4, 3, torch.float64), 1.0, 2) is None  # the kernel solves 1 or 2 dimensions


def test_plain_dense_is_the_network():
    """The double backward's formula is the module's own map."""
    for activation in ("cpila", "clipswish"):
        g = _network(activation, torch.float64)
        x = _inputs(20, 2, torch.float64)
        params, _, act, _ = pack_parameters(g, g._scaled_weights(2))
        with torch.no_grad(), kernels.enabled(False):
            value, jac = plain_dense(g, x, params, act, True)
            expected_value, expected_jac = g.jacobian(x)
        torch.testing.assert_close(value, expected_value, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(jac, expected_jac, rtol=1e-13, atol=1e-14)


@needs_kernels
@pytest.mark.parametrize("activation", ["cpila", "clipswish"])
def test_kernel_operators_pass_torch_library_checks(activation):
    """The torch operators that compiled graphs call: fake (shape) implementations, the registered
    autograd and schema, by torch.library.opcheck; their values and gradients equal the Function's."""
    from monoflow.lipschitz.dense_fused import dense_newton_operator, dense_operator

    g = _network(activation, torch.float64)
    params, hidden, act, kind = pack_parameters(g, g._scaled_weights(2))
    params = params.detach().requires_grad_(True)
    act = act.detach().requires_grad_(activation == "clipswish")
    x = _inputs(70, 2, torch.float64).requires_grad_(True)
    for with_jacobian in (False, True):
        torch.library.opcheck(dense_operator, (x, params, act, list(hidden), 2, kind, with_jacobian))
        value, jac = dense_operator(x, params, act, list(hidden), 2, kind, with_jacobian)
        expected = _FusedDense.apply(x, params, act, g, hidden, kind, with_jacobian)
        expected_value = expected[0] if with_jacobian else expected
        torch.testing.assert_close(value, expected_value, rtol=0, atol=0)
        loss = value.sin().sum() + (jac.square().sum() if with_jacobian else 0)
        wanted = [t for t in (x, params, act) if t.requires_grad]
        mine = torch.autograd.grad(loss, wanted)
        loss = expected_value.sin().sum() + (expected[1].square().sum() if with_jacobian else 0)
        for a, b in zip(mine, torch.autograd.grad(loss, wanted)):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    b = x.detach()
    torch.library.opcheck(dense_newton_operator, (b, params.detach(), act.detach(), list(hidden), kind, 2, True))
    with torch.no_grad():
        torch.testing.assert_close(dense_newton_operator(b, params.detach(), act.detach(), list(hidden), kind, 2, True),
                                   g.fused_newton(b, -1.0, 2), rtol=0, atol=0)


@needs_kernels
def test_compiled_monotone_loss_calls_the_kernel_operators():
    """CompiledFlowLoss switches the operators on for CPila DenseNets (not for CLipSwish ones)."""
    from monoflow.compiled import _use_kernel_operators
    from monoflow.models.toy import toy_flow

    monotone, idensenet = toy_flow("monotone", nblocks=2), toy_flow("idensenet", nblocks=2)
    assert _use_kernel_operators(monotone) and all(block.g.use_kernel_operators for block in monotone.blocks)
    assert not _use_kernel_operators(idensenet) and not any(block.g.use_kernel_operators for block in idensenet.blocks)


@needs_kernels
def test_input_that_requires_grad_keeps_the_plain_graph():
    """g(x) with x requiring grad is differentiated again by the series log-det estimators: it keeps the
    plain operators' graph; with x constant (a graph to the parameters only) the kernel computes."""
    g = _network("cpila", torch.float32)
    x = _inputs(20, 2, torch.float32)
    assert type(g(x).grad_fn).__name__ == "_FusedDenseBackward"
    value = g(x.clone().requires_grad_(True))
    assert "Fused" not in type(value.grad_fn).__name__
    assert type(g.jacobian(x.clone().requires_grad_(True))[1].grad_fn).__name__ == "_FusedDenseBackward"

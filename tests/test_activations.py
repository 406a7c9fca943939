"""Tests of monoflow.activations against closed forms, finite differences, autograd and the
constants stated in the paper (Pila minima, CPila / CLipSwish Lipschitz constants)."""
import math

import pytest
import torch

from monoflow.activations import (
    ACTIVATIONS,
    CLipSwish,
    CPila,
    CReLU,
    LipSwish,
    Pila,
    make_activation,
    pila,
    pila_derivative,
    pila_second_derivative,
    pila_third_derivative,
)

F64 = torch.float64
NAMES = sorted(ACTIVATIONS)


def pila_reference(x: torch.Tensor, k: float) -> torch.Tensor:
    """The paper's formula written directly in x (no clamping tricks), for moderate |x|."""
    negative = (k ** 2 * x ** 3 / 2 - k * x ** 2 + x) * torch.exp(k * x)
    return torch.where(x > 0, x, negative)


def dense_grid(low: float, high: float, n: int = 400_001) -> torch.Tensor:
    return torch.linspace(low, high, n, dtype=F64)


@pytest.mark.parametrize("k", [1.0, 5.0, 7.5])
def test_pila_matches_paper_formula(k):
    x = dense_grid(-6, 3, 10_001)
    torch.testing.assert_close(pila(x, k), pila_reference(x, k), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("k", [2.0, 5.0])
def test_pila_derivatives_match_autograd_and_finite_differences(k):
    x = dense_grid(-3, 1, 2001).requires_grad_(True)
    chain = [pila, pila_derivative, pila_second_derivative, pila_third_derivative]
    for f, df in zip(chain[:-1], chain[1:]):
        (grad,) = torch.autograd.grad(f(x, k).sum(), x)
        torch.testing.assert_close(grad, df(x, k).detach(), rtol=1e-10, atol=1e-10)
    h = 1e-6
    xd = x.detach()
    for f, df in zip(chain[:-1], chain[1:]):
        central = (f(xd + h, k) - f(xd - h, k)) / (2 * h)
        torch.testing.assert_close(central, df(xd, k), rtol=1e-5, atol=2e-5 * k ** 2)


def test_pila_spec_constants():
    x = dense_grid(-3, 1, 4_000_001)
    values = pila(x)
    i = values.argmin()
    assert values[i].item() == pytest.approx(-0.27422, abs=1e-5)
    assert x[i].item() == pytest.approx(-0.4539, abs=1e-4)
    slopes = pila_derivative(x)
    i = slopes.argmin()
    assert slopes[i].item() == pytest.approx(-0.348, abs=5e-4)
    assert x[i].item() == pytest.approx(-0.8, abs=1e-5)
    assert slopes.max().item() <= 1.0
    assert slopes.abs().max().item() <= Pila.lipschitz_constant


def test_cpila_spec_constants():
    x = dense_grid(-4, 4, 4_000_001)
    pair = torch.sqrt(pila_derivative(x - 0.2) ** 2 + pila_derivative(-x - 0.2) ** 2)
    i = pair.argmax()
    assert pair[i].item() == pytest.approx(1.05882, abs=1e-5)
    assert abs(x[i].item()) == pytest.approx(0.6, abs=1e-5)
    worst = pair.max().item() / 1.06
    assert worst == pytest.approx(0.99889, abs=1e-5)
    assert worst <= CPila.lipschitz_constant < worst + 1e-5


def test_cpila_other_k_bound_is_computed_and_valid():
    act = CPila(k=3.0)
    x = dense_grid(-10, 10, 2_000_001)
    pair = torch.sqrt(pila_derivative(x - 0.2, 3.0) ** 2 + pila_derivative(-x - 0.2, 3.0) ** 2) / 1.06
    assert pair.max().item() <= act.lipschitz_constant < pair.max().item() + 1e-3
    assert act.lipschitz_constant != CPila.lipschitz_constant


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_pila_is_c3_at_zero(order):
    """One-sided difference quotients of Pila^(order) agree at 0 for order < 3 ... and the
    fourth derivative jumps (4k^3 on the left, 0 on the right), so Pila is C^3 but not C^4."""
    chain = [pila, pila_derivative, pila_second_derivative, pila_third_derivative]
    f = chain[order]
    zero = torch.zeros(1, dtype=F64)
    h = 1e-7
    left = ((f(zero) - f(zero - h)) / h).item()
    right = ((f(zero + h) - f(zero)) / h).item()
    if order < 3:
        assert left == pytest.approx(right, abs=1e-3)  # O(k^3 h) from the left
        assert f(-torch.full((1,), 1e-12, dtype=F64)).item() == pytest.approx(f(zero).item(), abs=1e-9)
    else:
        assert left == pytest.approx(4 * 5.0 ** 3, rel=1e-3)
        assert right == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_and_gradgradcheck(name):
    torch.manual_seed(0)
    act = make_activation(name).double()
    x = (torch.randn(3, 4, dtype=F64) * 1.5).requires_grad_(True)
    if name == "crelu":  # keep away from the kink
        x = (x.detach() + 0.1 * torch.sign(x.detach())).requires_grad_(True)
    params = tuple(act.parameters())
    assert torch.autograd.gradcheck(lambda z, *p: act(z), (x, *params))
    assert torch.autograd.gradgradcheck(lambda z, *p: act(z), (x, *params))


@pytest.mark.parametrize("name", NAMES)
def test_derivative_is_the_jacobian(name):
    torch.manual_seed(1)
    act = make_activation(name).double()
    with torch.no_grad():
        for p in act.parameters():
            p.fill_(-0.3)  # a non-default beta
    x = torch.randn(5, 3, dtype=F64)
    x = x + 0.05 * torch.sign(x)
    jac = torch.autograd.functional.jacobian(lambda z: act(z), x)  # (5, C_out, 5, 3)
    deriv = act.derivative(x)
    assert deriv.shape == act(x).shape
    c_out = deriv.shape[1]
    for b in range(5):
        block = jac[b, :, b, :]
        expected = torch.zeros(c_out, 3, dtype=F64)
        for j in range(c_out):
            expected[j, j % 3] = deriv[b, j]
        torch.testing.assert_close(block, expected)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5, 5)])
def test_shapes(name, shape):
    act = make_activation(name)
    x = torch.randn(*shape)
    out = act(x)
    factor = 2 if act.concatenates else 1
    assert out.shape == (shape[0], factor * shape[1], *shape[2:])
    assert act.derivative(x).shape == out.shape
    if act.concatenates:
        with pytest.raises(ValueError, match="dim 1"):
            act(torch.randn(5))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_no_nan_for_large_inputs(name, dtype):
    act = make_activation(name).to(dtype)
    x = torch.tensor([-1e4, -1e3, -50.0, -1.0, 0.0, 1.0, 50.0, 1e3, 1e4], dtype=dtype)
    x = x.reshape(1, -1).requires_grad_(True)
    out = act(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    (grad2,) = torch.autograd.grad(grad.sum(), x, allow_unused=True, materialize_grads=True)
    for t in (out, grad, grad2, act.derivative(x)):
        assert torch.isfinite(t).all()
    assert out.dtype == dtype


def test_pila_large_negative_is_exactly_zero_and_positive_is_identity():
    x = torch.tensor([-1e4, -200.0, 3.0, 1e4])
    torch.testing.assert_close(pila(x), torch.tensor([0.0, 0.0, 3.0, 1e4]))
    torch.testing.assert_close(pila_derivative(x), torch.tensor([0.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("b", [-3.0, 0.5, 4.0])
def test_lipswish_constants_by_grid(b):
    x = dense_grid(-400, 400, 2_000_001).reshape(-1, 1)
    single = LipSwish().double()
    pair = CLipSwish().double()
    with torch.no_grad():
        single.b.fill_(b)
        pair.b.fill_(b)
        d = single.derivative(x)
        worst_single = d.abs().max().item()
        dp = pair.derivative(x)
        worst_pair = torch.sqrt(dp[:, 0] ** 2 + dp[:, 1] ** 2).max().item()
    assert worst_single <= LipSwish.lipschitz_constant < worst_single + 1e-4
    assert worst_pair <= CLipSwish.lipschitz_constant < worst_pair + 1e-4
    assert worst_pair == pytest.approx(0.99997, abs=1e-5)


def test_crelu_and_pila_constants():
    x = dense_grid(-5, 5, 100_001).reshape(-1, 1)
    d = CReLU().derivative(x)
    assert torch.sqrt(d[:, 0] ** 2 + d[:, 1] ** 2).max().item() == 1.0 == CReLU.lipschitz_constant
    assert Pila(k=2.0).derivative(x).abs().max().item() <= Pila.lipschitz_constant


def test_parameters_per_module():
    assert sum(p.numel() for p in LipSwish().parameters()) == 1
    assert sum(p.numel() for p in CLipSwish().parameters()) == 1
    for cls in (Pila, CPila, CReLU):
        assert sum(p.numel() for p in cls().parameters()) == 0
    assert LipSwish().b.item() == 0.5
    assert CLipSwish().beta.item() == pytest.approx(math.log1p(math.exp(0.5)))


def test_clipswish_values():
    act = CLipSwish().double()
    x = torch.tensor([[-1.5, 0.3]], dtype=F64)
    beta = math.log1p(math.exp(0.5))

    def f(v):
        return v / (1 + math.exp(-beta * v)) / 1.1

    expected = torch.tensor([[f(-1.5), f(0.3), f(1.5), f(-0.3)]], dtype=F64) / 1.004
    torch.testing.assert_close(act(x), expected)


def test_cpila_values():
    x = torch.tensor([[-0.7, 0.0, 1.2]], dtype=F64)
    expected = torch.cat([pila_reference(x - 0.2, 5.0), pila_reference(-x - 0.2, 5.0)], dim=1) / 1.06
    torch.testing.assert_close(CPila()(x), expected)


def test_make_activation_errors_and_fresh_instances():
    with pytest.raises(ValueError, match="clipswish"):
        make_activation("swish")
    with pytest.raises(ValueError, match="expected one of"):
        make_activation(3)  # type: ignore[arg-type]
    assert make_activation("LipSwish").b is not make_activation("lipswish").b
    with pytest.raises(ValueError, match="k > 0"):
        Pila(k=0.0)


def test_float32_matches_float64():
    x = torch.linspace(-3, 3, 101).reshape(-1, 1)
    for name in NAMES:
        act = make_activation(name)
        torch.testing.assert_close(act(x), act.double()(x.double()).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_torch_func_transforms_work(name):
    """vmap(jacrev(...)) (as an exact log-det may use) agrees with derivative()."""
    act = make_activation(name).double()
    x = torch.randn(6, 2, dtype=F64) + 0.01
    jac = torch.func.vmap(torch.func.jacrev(lambda z: act(z[None])[0]))(x)  # (6, C_out, 2)
    deriv = act.derivative(x)
    expected = deriv.unsqueeze(-1) * torch.eye(2, dtype=F64).repeat(deriv.shape[1] // 2, 1)
    torch.testing.assert_close(jac, expected)


def test_value_and_derivative_in_one_pass():
    # oracle: the separate closed forms, and gradcheck / gradgradcheck of the fused Function
    from monoflow.activations import CPila, Pila, pila_value_and_derivative
    x = torch.linspace(-3, 3, 61, dtype=torch.float64).reshape(61, 1).repeat(1, 2)
    value, slope = pila_value_and_derivative(x)
    assert torch.allclose(value, pila(x), atol=1e-15)
    assert torch.allclose(slope, pila_derivative(x), atol=1e-15)
    for module in (Pila(), CPila()):
        value, slope = module.value_and_derivative(x)
        assert torch.allclose(value, module(x), atol=1e-15)
        assert torch.allclose(slope, module.derivative(x), atol=1e-15)
    probe = (torch.randn(7, 3, dtype=torch.float64) * 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: pila_value_and_derivative(z), (probe,))
    assert torch.autograd.gradgradcheck(lambda z: pila_value_and_derivative(z), (probe,))

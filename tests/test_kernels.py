"""The fused kernels (monoflow.kernels) of CPila and (C)LipSwish against their plain operators, and
their fallbacks."""
import os
import platform
import shutil
import subprocess

import pytest
import torch

from monoflow import kernels
from monoflow.activations import CLipSwish, CPila, LipSwish, pila_second_derivative

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"fused kernels: {kernels.status()['reason']}")

TOLERANCES = {torch.float32: dict(rtol=2e-6, atol=3e-7), torch.float64: dict(rtol=1e-14, atol=1e-15)}


def _inputs(shape, dtype, seed=0):
    """Values over the whole range of Pila (both branches, the clamp at t = -60) and the special
    values NaN, +inf, -inf and the kink x = -shift."""
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed)) * 2.0
    flat = x.view(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.2, 0.2, -30.0], dtype=dtype)
    return x


def _assert_fused_equals_plain(activation, x):
    """value_and_derivative and the value alone, fused and plain, without autograd."""
    assert kernels.applicable(x)
    with torch.no_grad():
        with kernels.enabled(False):
            plain = (*activation.value_and_derivative(x), activation(x))
        fused = (*activation.value_and_derivative(x), activation(x))
    halves = 2 if activation.concatenates else 1
    for mine, theirs in zip(fused, plain):
        assert mine.shape == theirs.shape == (x.shape[0], halves * x.shape[1]) + x.shape[2:]
        torch.testing.assert_close(mine, theirs, equal_nan=True, **TOLERANCES[x.dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(500, 8), (3, 4, 5, 6), (2, 3)])
def test_fused_values_match_plain_operators(dtype, shape):
    _assert_fused_equals_plain(CPila(), _inputs(shape, dtype))


@needs_kernels
def test_fused_exponential_is_accurate_over_the_clamped_range():
    """Against the plain operators in float64 at the same inputs: the float64 kernel within a few
    rounding errors, the float32 one about as close as the plain float32 operators (its e^t has a
    degree-7 polynomial; both lose digits to cancellation in the cubic polynomials)."""
    x32 = torch.linspace(-13.0, 13.0, 200_001).reshape(1, -1)
    activation = CPila()
    with torch.no_grad():
        with kernels.enabled(False):
            exact = activation.value_and_derivative(x32.double())
        for mine, plain in zip(activation.value_and_derivative(x32.double()), exact):
            torch.testing.assert_close(mine, plain, rtol=2e-15, atol=1e-16)
        with kernels.enabled(False):
            plain32 = activation.value_and_derivative(x32)
        for mine, plain, reference in zip(activation.value_and_derivative(x32), plain32, exact):
            error = (mine.double() - reference).abs().max()
            assert error <= 1.5 * (plain.double() - reference).abs().max()


@needs_kernels
@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 3, 3)])
def test_fused_gradients_pass_gradcheck_and_gradgradcheck(shape):
    """Backward by the kernel (gradcheck); double backward by the plain operators (gradgradcheck)."""
    activation = CPila()
    x = (torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.6)
    x.requires_grad_(True)
    assert kernels.applicable(x)
    assert type(activation(x).grad_fn).__name__.startswith("_FusedCPila")
    assert torch.autograd.gradcheck(activation, (x,))
    assert torch.autograd.gradcheck(activation.value_and_derivative, (x,))
    assert torch.autograd.gradgradcheck(activation, (x,))
    assert torch.autograd.gradgradcheck(activation.value_and_derivative, (x,))


@needs_kernels
def test_fused_backward_matches_plain_backward_with_strided_gradients():
    activation = CPila()
    x = _inputs((40, 6), torch.float32)[:, ::2].clone()  # no NaN in the gradients' check
    x = torch.nan_to_num(x, nan=0.3, posinf=5.0, neginf=-5.0).requires_grad_(True)
    weights = torch.randn(6, 40).t()  # a non-contiguous incoming gradient

    def gradient(fused: bool):
        with kernels.enabled(fused):
            value, slope = activation.value_and_derivative(x)
            (grad,) = torch.autograd.grad((value * weights).sum() + (slope * weights.flip(0)).sum(), x)
        return grad

    torch.testing.assert_close(gradient(True), gradient(False), rtol=2e-6, atol=2e-6)


@needs_kernels
def test_backward_of_the_kernel_uses_the_second_derivative():
    r"""d/dx of sum(slope) is sum over halves of P''(u)/c: checked against the closed form."""
    activation = CPila()
    x = torch.tensor([[-0.9, -0.3, 0.1, 0.5, 1.2]], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(activation.value_and_derivative(x)[1].sum(), x)
    with torch.no_grad():
        expected = (pila_second_derivative(x - 0.2) + pila_second_derivative(-x - 0.2)) / 1.06
    torch.testing.assert_close(grad, expected, rtol=1e-13, atol=1e-15)


def test_plain_operators_under_torch_func_transforms():
    """jacrev of CPila (transforms active: the plain path) equals the diagonal of its derivative."""
    activation = CPila()
    x = torch.randn(1, 3, dtype=torch.float64)
    jacobian = torch.func.jacrev(activation)(x)  # (1, 6, 1, 3)
    slope = activation.derivative(x)
    expected = torch.cat([torch.diag(slope[0, :3]), torch.diag(slope[0, 3:])]).reshape(1, 6, 1, 3)
    torch.testing.assert_close(jacobian, expected)


def test_switched_off_by_environment_variable(monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "0")
    library, state = kernels._load()
    assert library is None and not state["available"] and kernels.DISABLE_VARIABLE in state["reason"]


def test_no_compiler_and_failing_compiler_say_why(monkeypatch, tmp_path):
    monkeypatch.delenv(kernels.DISABLE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    library, state = kernels._load()
    assert library is None and "no C compiler" in state["reason"]

    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    library, state = kernels._load()
    assert library is None and "failed" in state["reason"]
    assert not any(tmp_path.rglob("*.so"))


@pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler")
def test_build_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.delenv(kernels.DISABLE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    library, state = kernels._load()
    assert library is not None and state["available"], state["reason"]
    path = state["library"]
    assert path.startswith(str(tmp_path)) and os.path.exists(path)
    built = os.stat(path).st_mtime_ns
    again, state_again = kernels._load()
    assert state_again["library"] == path and os.stat(path).st_mtime_ns == built  # loaded, not rebuilt


@needs_kernels
@pytest.mark.parametrize("make", [LipSwish, CLipSwish])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(500, 8), (3, 4, 5, 6)])
def test_fused_lipswish_values_match_plain_operators(make, dtype, shape):
    activation = make().to(dtype)
    with torch.no_grad():
        activation.b.fill_(-0.7)  # beta = softplus(b) away from its initial value
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(4)) * 3.0
    x.view(-1)[:3] = torch.tensor([float("nan"), 80.0, -80.0], dtype=dtype)  # NaN, sigmoid's far tails
    _assert_fused_equals_plain(activation, x)


@needs_kernels
@pytest.mark.parametrize("make", [LipSwish, CLipSwish])
def test_fused_lipswish_gradients_in_x_and_b(make):
    """gradcheck / gradgradcheck in x and in the learnable b (through beta = softplus(b)): the
    kernel's backward, and the plain operators' for the double backward."""
    activation = make().double()
    x = (torch.randn(5, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 1.5).requires_grad_(True)
    b = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def with_b(function):
        def run(x, b):
            with torch.no_grad():
                activation.b.copy_(b)
            activation.b.requires_grad_(False)
            # route b's gradient through beta = softplus(b) as the module does
            beta = torch.nn.functional.softplus(b)
            return function(x, beta)
        return run

    def value_and_slope(x, beta):
        from monoflow.activations import _FusedLipSwish
        return _FusedLipSwish.apply(x, beta, activation.halves, activation.scale, True)

    assert kernels.applicable(x)
    assert type(activation(x).grad_fn).__name__ == "_FusedLipSwishBackward"
    assert torch.autograd.gradcheck(with_b(value_and_slope), (x, b))
    assert torch.autograd.gradgradcheck(with_b(value_and_slope), (x, b))
    # the module's own path: gradients reach x and b
    activation.b.requires_grad_(True)
    value, slope = activation.value_and_derivative(x)
    grads = torch.autograd.grad(value.sum() + slope.square().sum(), (x, activation.b))
    with kernels.enabled(False):
        value, slope = activation.value_and_derivative(x)
        expected = torch.autograd.grad(value.sum() + slope.square().sum(), (x, activation.b))
    for mine, plain in zip(grads, expected):
        torch.testing.assert_close(mine, plain, rtol=1e-12, atol=1e-14)


@needs_kernels
def test_large_inputs_split_over_threads_give_the_same_results(one_and_three_threads):
    """Inputs above PARALLEL_ELEMENTS run in row blocks on several threads: the same numbers as
    one block (a small threshold here, with an odd number of rows)."""
    x = torch.randn(37, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    activations = [CPila(), CLipSwish().double(), LipSwish().double()]

    def results():
        out = []
        for activation in activations:
            value, slope = activation.value_and_derivative(x)
            out += [value, slope, *torch.autograd.grad((value.sin() + slope.cos()).sum(), (x, *activation.parameters()))]
        return out

    single, split = one_and_three_threads(results, kernels, "PARALLEL_ELEMENTS", 16)
    for a, b in zip(single, split):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


@pytest.mark.skipif(shutil.which("gcc") is None or platform.machine() not in ("x86_64", "AMD64"),
                    reason="needs gcc targeting x86-64")
def test_every_loop_vectorises_for_avx2_as_for_avx512(tmp_path):
    """With the library's flags, gcc vectorises the same loops for an AVX2 target as for an AVX-512
    one (compiled for both targets, run on neither). Without -fno-trapping-math, or with a
    float-to-int64 conversion in exp, the activations' loops stayed scalar on AVX2 (78 of 138)."""
    source = tmp_path / "kernels.c"
    source.write_text(kernels.SOURCE)
    flags = [flag for flag in kernels._FLAGS if not flag.startswith("-march")]

    def vectorised(target):
        completed = subprocess.run(["gcc", *flags, f"-march={target}", "-fopt-info-vec-optimized",
                                    "-o", str(tmp_path / f"{target}.so"), str(source)],
                                   capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-2000:]
        return completed.stderr.count("loop vectorized")

    avx2, avx512 = vectorised("haswell"), vectorised("skylake-avx512")
    assert avx512 > 100
    assert avx2 == avx512

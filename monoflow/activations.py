r"""Lipschitz activations for the network :math:`g` of monotone and residual blocks.

Everything here works in float32 and float64 on any device with plain PyTorch operators; on a
CPU, CPila and (C)LipSwish compute with the fused kernels of :mod:`monoflow.kernels` where they
are built (the same values up to rounding, one pass instead of a dozen to twenty operators). All
activations expose the same small interface so that :mod:`monoflow.lipschitz` can propagate
Jacobians and certify Lipschitz constants without knowing which activation it holds:

- ``forward(x)``: the activation; a *concatenating* activation maps ``(B, C, ...)`` to
  ``(B, 2C, ...)`` as ``cat([a_1(x), a_2(x)], dim=1)``.
- ``derivative(x)``: the elementwise derivative, of the output's shape. For a concatenating
  activation it is ``cat([a_1'(x), a_2'(x)], dim=1)``, so the Jacobian of the activation is
  ``cat([diag(a_1'(x)), diag(a_2'(x))], dim=0)`` (two diagonal blocks stacked along the output).
- optionally ``value_and_derivative(x)``: both at once, cheaper than two calls (Pila, CPila).
- ``concatenates`` (bool) and ``lipschitz_constant`` (a float upper bound of the Lipschitz
  constant with respect to the Euclidean norm). For a concatenating activation the bound is
  :math:`\sup_x \sqrt{a_1'(x)^2 + a_2'(x)^2}`, the largest column norm of its Jacobian.

Pila (Ahn et al. 2022), with :math:`t = kx`:

.. math::

    \mathrm{Pila}_k(x) = x \ (x > 0), \qquad
    \mathrm{Pila}_k(x) = \tfrac{1}{k}\,(t^3/2 - t^2 + t)\,e^{t} \ (x \le 0),

    \mathrm{Pila}_k'(x) = (t^3/2 + t^2/2 - t + 1)\,e^{t}, \quad
    \mathrm{Pila}_k''(x) = k\,(t^3/2 + 2t^2)\,e^{t}, \quad
    \mathrm{Pila}_k'''(x) = k^2\,(t^3/2 + 7t^2/2 + 4t)\,e^{t} \quad (x \le 0).

The second and third derivatives vanish at 0 from both sides, so Pila is :math:`C^3`.
Its minimum is -0.27422 (x = -0.4539 for k = 5), the minimum of Pila' is -0.348 (t = -4) and
Pila' <= 1, so Pila is 1-Lipschitz for every k.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from monoflow import kernels

__all__ = [
    "pila",
    "pila_derivative",
    "pila_second_derivative",
    "pila_third_derivative",
    "pila_value_and_derivative",
    "Pila",
    "CPila",
    "LipSwish",
    "CLipSwish",
    "CReLU",
    "ACTIVATIONS",
    "make_activation",
]

# t = k x is clamped at -60, where Pila and its derivatives are below 1e-20: exp of very negative
# arguments and the denormal numbers it returns make every later operation on the CPU up to 10x
# slower, and the cubic polynomials stay finite (no inf * 0 = nan).
_T_MIN = -60.0

# sup_t |t^3/2 + 2 t^2| e^t over t <= 0 (about 0.62886): bounds |Pila''| / k, used for grid margins.
_PILA_SECOND_DERIVATIVE_SUP_OVER_K = 0.629


def _check_k(k: float) -> float:
    k = float(k)
    if not 0 < k < math.inf:  # also rejects nan; plain comparisons trace under torch.compile
        raise ValueError(f"Pila needs a finite k > 0, got k={k}")
    return k


def _negative_part_t(x: torch.Tensor, k: float) -> torch.Tensor:
    """t = k * min(x, 0), clamped at _T_MIN."""
    return k * x.clamp(min=_T_MIN / k, max=0.0)


def _times_exp(polynomial: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """polynomial * exp(t); at the clamp t = -60 the product is below 1e-20 and a normal float."""
    return polynomial * torch.exp(t)


def _value_polynomial(t: torch.Tensor, k: float) -> torch.Tensor:
    """(t^3/2 - t^2 + t) / k: Pila(x) = this times e^t for x <= 0."""
    return ((t / 2 - 1) * t + 1) * t / k


def _slope_polynomial(t: torch.Tensor) -> torch.Tensor:
    """t^3/2 + t^2/2 - t + 1: Pila'(x) = this times e^t for x <= 0."""
    return ((t / 2 + 0.5) * t - 1) * t + 1


def pila(x: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    r"""Pila activation: :math:`x` for :math:`x > 0`, :math:`(t^3/2 - t^2 + t)e^t / k` with
    :math:`t = kx` for :math:`x \le 0`. Differentiable by autograd; never evaluates
    :math:`e^{kx}` for :math:`x > 0`.

    >>> pila(torch.tensor([-0.4539, 0.0, 2.0])).round(decimals=5)
    tensor([-0.2742,  0.0000,  2.0000])
    """
    k = _check_k(k)
    t = _negative_part_t(x, k)
    negative = _times_exp(_value_polynomial(t, k), t)
    return torch.where(x > 0, x, negative)


def pila_derivative(x: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    r"""First derivative of Pila: 1 for :math:`x > 0`, :math:`(t^3/2 + t^2/2 - t + 1)e^t` with
    :math:`t = kx` for :math:`x \le 0`. Values lie in [-0.348, 1]. Differentiable by autograd.
    """
    k = _check_k(k)
    t = _negative_part_t(x, k)
    negative = _times_exp(_slope_polynomial(t), t)
    return torch.where(x > 0, torch.ones_like(x), negative)


def pila_second_derivative(x: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    r"""Second derivative of Pila: 0 for :math:`x > 0`, :math:`k(t^3/2 + 2t^2)e^t` for
    :math:`x \le 0` (:math:`t = kx`)."""
    k = _check_k(k)
    t = _negative_part_t(x, k)
    negative = _times_exp(k * (t / 2 + 2) * t * t, t)
    return torch.where(x > 0, torch.zeros_like(x), negative)


def pila_third_derivative(x: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    r"""Third derivative of Pila: 0 for :math:`x > 0`, :math:`k^2(t^3/2 + 7t^2/2 + 4t)e^t` for
    :math:`x \le 0` (:math:`t = kx`)."""
    k = _check_k(k)
    t = _negative_part_t(x, k)
    negative = _times_exp(k * k * ((t / 2 + 3.5) * t + 4) * t, t)
    return torch.where(x > 0, torch.zeros_like(x), negative)


class _PilaFunction(torch.autograd.Function):
    """Pila with a hand-written backward ``grad * Pila'(x)``.

    Only ``x`` is saved (not the intermediate tensors of the closed form). The backward is made
    of ordinary differentiable ops, so double backward (gradients of gradients) works.
    """

    # Classic forward(ctx, ...) style: the setup_context style inspects the signature on every
    # call, which costs more than Pila itself on small tensors.
    @staticmethod
    def forward(ctx, x: torch.Tensor, k: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.k = k
        return pila(x, k)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad_output * pila_derivative(x, ctx.k), None


class _PilaFunctionTransformable(torch.autograd.Function):
    """The same Function in the setup_context style that torch.func transforms (vmap, jacrev)
    require; used only while such a transform is active."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, k: float) -> torch.Tensor:  # type: ignore[override]
        return pila(x, k)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(inputs[0])
        ctx.k = inputs[1]

    backward = _PilaFunction.backward


def _transforms_active() -> bool:
    return getattr(torch._C, "_are_functorch_transforms_active", lambda: False)()


def _apply_pila(x: torch.Tensor, k: float) -> torch.Tensor:
    if not torch.is_grad_enabled():  # no graph to record (the solvers' iterations): the plain ops
        return pila(x, k)
    function = _PilaFunctionTransformable if _transforms_active() else _PilaFunction
    return function.apply(x, k)


class _PilaValueAndDerivative(torch.autograd.Function):
    """``(Pila(x), Pila'(x))`` from one evaluation of :math:`t = kx` and :math:`e^t`.

    Backward: ``grad_value * Pila'(x) + grad_slope * Pila''(x)``, from ``x`` and the saved slope
    with ordinary differentiable ops (double backward works)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: float):  # type: ignore[override]
        t = _negative_part_t(x, k)
        e = torch.exp(t)
        positive = x > 0
        value = torch.where(positive, x, _value_polynomial(t, k) * e)
        slope = torch.where(positive, 1.0, _slope_polynomial(t) * e)
        ctx.save_for_backward(x, slope)
        ctx.k = k
        return value, slope

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor, grad_slope: torch.Tensor):  # type: ignore[override]
        x, slope = ctx.saved_tensors
        grad = None if grad_value is None else grad_value * slope
        if grad_slope is not None:
            curvature = grad_slope * pila_second_derivative(x, ctx.k)
            grad = curvature if grad is None else grad + curvature
        return grad, None


def pila_value_and_derivative(x: torch.Tensor, k: float = 5.0):
    r"""``(Pila(x), Pila'(x))`` at the cost of about one of them (both differentiable).

    >>> value, slope = pila_value_and_derivative(torch.tensor([-0.4539, 2.0]))
    >>> value.round(decimals=4), slope.abs().round(decimals=3)
    (tensor([-0.2742,  2.0000]), tensor([0., 1.]))
    """
    k = _check_k(k)
    if _transforms_active():  # vmap / jacrev need the setup_context style: use the plain ops
        return pila(x, k), pila_derivative(x, k)
    return _PilaValueAndDerivative.apply(x, k)


def _check_concat_input(x: torch.Tensor, name: str) -> None:
    if x.dim() < 2:
        raise ValueError(
            f"{name} concatenates along dim 1 and needs an input of shape (B, C) or (B, C, H, W); "
            f"got shape {tuple(x.shape)}"
        )


class Pila(nn.Module):
    r"""Pila activation module (elementwise, 1-Lipschitz: :math:`-0.348 \le \mathrm{Pila}' \le 1`).

    Args:
        k: sharpness of the negative part (paper: 5).

    >>> Pila()(torch.tensor([-1.0, 1.0])).shape
    torch.Size([2])
    """

    concatenates: bool = False
    lipschitz_constant: float = 1.0

    def __init__(self, k: float = 5.0) -> None:
        super().__init__()
        self.k = _check_k(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply_pila(x, self.k)

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise derivative Pila'(x)."""
        return pila_derivative(x, self.k)

    def value_and_derivative(self, x: torch.Tensor):
        """``(Pila(x), Pila'(x))`` in one pass."""
        return pila_value_and_derivative(x, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


def _cpila_lipschitz_bound(k: float, shift: float, scale: float, n: int = 2_000_001) -> float:
    r"""Upper bound of :math:`\sup_x \sqrt{P'(x-s)^2 + P'(-x-s)^2}/c` by a dense grid plus the
    grid-spacing error (the function's slope is at most :math:`\sqrt2 \sup|P''| / c`)."""
    half_width = 60.0 / k + shift
    x = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    value = torch.sqrt(pila_derivative(x - shift, k) ** 2 + pila_derivative(-x - shift, k) ** 2)
    spacing = 2 * half_width / (n - 1)
    slope = math.sqrt(2.0) * k * _PILA_SECOND_DERIVATIVE_SUP_OVER_K
    # outside the grid one component is 1 and the other below 1e-20 in size
    return (value.max().item() + slope * spacing / 2 + 1e-12) / scale


def _cpila_slope(x: torch.Tensor, k: float, shift: float, scale: float) -> torch.Tensor:
    r""":math:`[P'(x - s), -P'(-x - s)] / c` along dim 1 with plain (differentiable) operators."""
    first, second = pila_derivative(torch.cat([x, -x], dim=1) - shift, k).chunk(2, dim=1)
    return torch.cat([first, -second], dim=1) / scale


def _cpila_curvature(x: torch.Tensor, k: float, shift: float, scale: float) -> torch.Tensor:
    r""":math:`[P''(x - s), P''(-x - s)] / c` along dim 1 (the derivative in x of each half of
    the slope) with plain (differentiable) operators."""
    return pila_second_derivative(torch.cat([x, -x], dim=1) - shift, k) / scale


def _sum_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=1)
    return first + second


class _FusedCPila(torch.autograd.Function):
    """CPila by the fused kernel: the value, or ``(value, slope)``; backward (the slope's gradient
    through :math:`P''`) by the kernel, or by plain differentiable operators when the backward
    itself is recorded (double backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: float, shift: float, scale: float,  # type: ignore[override]
                with_slope: bool):
        ctx.save_for_backward(x)
        ctx.constants = (k, shift, scale)
        value, slope = kernels.cpila_forward(x, k, shift, scale, with_slope)
        return (value, slope) if with_slope else value

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor, grad_slope: Optional[torch.Tensor] = None):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        given = grad_value if grad_value is not None else grad_slope
        if torch.is_grad_enabled() or not kernels.applicable(given):
            grad = 0.0
            if grad_value is not None:
                grad = grad_value * _cpila_slope(x, *ctx.constants)
            if grad_slope is not None:
                grad = grad + grad_slope * _cpila_curvature(x, *ctx.constants)
            return _sum_halves(grad), None, None, None, None
        return kernels.cpila_backward(x, grad_value, grad_slope, *ctx.constants), None, None, None, None


class CPila(nn.Module):
    r"""Concatenated Pila: :math:`[\mathrm{Pila}(x - 0.2), \mathrm{Pila}(-x - 0.2)] / 1.06` along
    dim 1 (doubles the channels).

    The unscaled pair has Lipschitz constant 1.05882 (at :math:`x = \pm 0.6`), so CPila's is
    0.99889 < 1 for k = 5 (for another k the bound is computed at construction).

    >>> CPila()(torch.zeros(4, 3)).shape
    torch.Size([4, 6])
    """

    concatenates: bool = True
    lipschitz_constant: float = 0.99889  # k = 5; checked by a dense grid in the tests
    shift: float = 0.2
    scale: float = 1.06

    def __init__(self, k: float = 5.0) -> None:
        super().__init__()
        self.k = _check_k(k)
        if self.k != 5.0:
            self.lipschitz_constant = _cpila_lipschitz_bound(self.k, self.shift, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_concat_input(x, "CPila")
        if kernels.applicable(x):
            if torch.is_grad_enabled() and x.requires_grad:
                return _FusedCPila.apply(x, self.k, self.shift, self.scale, False)
            return kernels.cpila_forward(x, self.k, self.shift, self.scale, with_slope=False)[0]
        # one Pila call on both halves: half the kernel launches of two calls
        return _apply_pila(torch.cat([x, -x], dim=1) - self.shift, self.k) / self.scale

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`[\mathrm{Pila}'(x - 0.2), -\mathrm{Pila}'(-x - 0.2)] / 1.06` along dim 1."""
        _check_concat_input(x, "CPila")
        return _cpila_slope(x, self.k, self.shift, self.scale)

    def value_and_derivative(self, x: torch.Tensor):
        """``(CPila(x), CPila'(x))`` (as :meth:`forward` and :meth:`derivative`) in one pass."""
        _check_concat_input(x, "CPila")
        if kernels.applicable(x):
            if torch.is_grad_enabled() and x.requires_grad:
                return _FusedCPila.apply(x, self.k, self.shift, self.scale, True)
            return kernels.cpila_forward(x, self.k, self.shift, self.scale, with_slope=True)
        value, slope = pila_value_and_derivative(torch.cat([x, -x], dim=1) - self.shift, self.k)
        return value / self.scale, slope * self._slope_signs(x)

    def _slope_signs(self, x: torch.Tensor) -> torch.Tensor:
        """``[+1/scale] * C + [-1/scale] * C`` along dim 1, broadcastable against the output."""
        def signs() -> torch.Tensor:
            ones = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
            return (torch.cat([ones, -ones]) / self.scale).view((1, -1) + (1,) * (x.dim() - 2))

        if torch.compiler.is_compiling():  # a constant inside a compiled graph: no cache
            return signs()
        key = (x.shape[1], x.dim(), x.dtype, x.device)
        cache = self.__dict__.setdefault("_sign_cache", {})
        if key not in cache:
            cache[key] = signs()
        return cache[key]

    def extra_repr(self) -> str:
        return f"k={self.k}"


def _lipswish(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(beta * x) / 1.1


def _lipswish_derivative(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(beta * x)
    return (s + beta * x * s * (1 - s)) / 1.1


def _lipswish_backward_plain(x: torch.Tensor, beta: torch.Tensor, grad_value: Optional[torch.Tensor],
                             grad_slope: Optional[torch.Tensor], halves: int, scale: float):
    r"""The gradients in x and :math:`\beta` of :math:`\langle\bar v, \text{value}\rangle +
    \langle\bar s, \text{slope}\rangle` for (C)LipSwish, with plain differentiable operators (the
    double backward of the fused kernels): with :math:`z = \beta u`, :math:`\sigma' = \sigma(1-\sigma)`
    and :math:`\kappa = 2 + z(1 - 2\sigma)`, :math:`f'' = \beta\sigma'\kappa/1.1`,
    :math:`\partial_\beta f = u^2\sigma'/1.1`, :math:`\partial_\beta f' = u\sigma'\kappa/1.1`; half
    h reads :math:`u = \pm x`."""
    grad_x, grad_beta = 0.0, 0.0
    values = grad_value.chunk(halves, dim=1) if grad_value is not None else [None] * halves
    slopes = grad_slope.chunk(halves, dim=1) if grad_slope is not None else [None] * halves
    for sign, gv, gs in zip((1.0, -1.0), values, slopes):
        u = sign * x
        z = beta * u
        s = torch.sigmoid(z)
        ds = s * (1 - s)
        bend = 2 + z * (1 - 2 * s)
        if gv is not None:
            grad_x = grad_x + sign * gv * (s + z * ds) / 1.1
            grad_beta = grad_beta + gv * u * u * ds / 1.1
        if gs is not None:
            grad_x = grad_x + gs * beta * ds * bend / 1.1
            grad_beta = grad_beta + sign * gs * u * ds * bend / 1.1
    return grad_x / scale, (grad_beta / scale).sum().reshape(beta.shape)


class _FusedLipSwish(torch.autograd.Function):
    """(C)LipSwish with a scalar :math:`\\beta` by the fused kernels: the value, or
    ``(value, slope)``; backward (in x and :math:`\\beta`) by the kernel, or by plain differentiable
    operators when the backward itself is recorded."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, beta: torch.Tensor, halves: int, scale: float,  # type: ignore[override]
                with_slope: bool):
        ctx.save_for_backward(x, beta)
        ctx.constants = (halves, scale)
        value, slope = kernels.lipswish_forward(x, float(beta), halves, scale, with_slope)
        return (value, slope) if with_slope else value

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor, grad_slope: Optional[torch.Tensor] = None):  # type: ignore[override]
        x, beta = ctx.saved_tensors
        halves, scale = ctx.constants
        given = grad_value if grad_value is not None else grad_slope
        if torch.is_grad_enabled() or not kernels.applicable(given):
            grad_x, grad_beta = _lipswish_backward_plain(x, beta, grad_value, grad_slope, halves, scale)
        else:
            grad_x, grad_beta = kernels.lipswish_backward(x, grad_value, grad_slope, float(beta), halves, scale)
            grad_beta = grad_beta.reshape(beta.shape).to(beta.dtype)
        return grad_x, grad_beta, None, None, None


class LipSwish(nn.Module):
    r"""LipSwish: :math:`x\,\sigma(\beta x) / 1.1` with :math:`\beta = \mathrm{softplus}(b)` and
    a learnable scalar :math:`b` (initialised to 0.5).

    With :math:`t = \beta x` the derivative is :math:`(\sigma(t) + t\sigma(t)(1-\sigma(t)))/1.1`,
    a function of :math:`t` alone, in [-0.0908, 0.99986] for every :math:`\beta > 0`. On a CPU the
    module's own :math:`\beta` computes through the fused kernels of :mod:`monoflow.kernels`.
    """

    concatenates: bool = False
    lipschitz_constant: float = 0.99986
    #: outputs per input channel (CLipSwish: 2) and the divisor of the output
    halves: int = 1
    scale: float = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor(0.5))

    @property
    def beta(self) -> torch.Tensor:
        return F.softplus(self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused(x, with_slope=False)
        return fused[0] if fused is not None else self.forward_with_beta(x, self.beta)

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise derivative (differentiable in x and in b)."""
        return self.derivative_with_beta(x, self.beta)

    def value_and_derivative(self, x: torch.Tensor):
        """``(f(x), f'(x))`` (as :meth:`forward` and :meth:`derivative`) in one pass."""
        fused = self._fused(x, with_slope=True)
        if fused is not None:
            return fused
        beta = self.beta
        return self.forward_with_beta(x, beta), self.derivative_with_beta(x, beta)

    def _fused(self, x: torch.Tensor, with_slope: bool):
        """``(value, slope or None)`` by the fused kernels, or ``None`` where they do not apply."""
        if not kernels.applicable(x):
            return None
        if self.halves == 2:
            _check_concat_input(x, type(self).__name__)
        beta = self.beta
        if torch.is_grad_enabled() and (x.requires_grad or beta.requires_grad):
            out = _FusedLipSwish.apply(x, beta, self.halves, self.scale, with_slope)
            return out if with_slope else (out, None)
        return kernels.lipswish_forward(x, float(beta), self.halves, self.scale, with_slope)

    def forward_with_beta(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """The activation with a given :math:`\\beta` (a scalar, or one per row of ``x``)."""
        return _lipswish(x, beta)

    def derivative_with_beta(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return _lipswish_derivative(x, beta)


class CLipSwish(LipSwish):
    r"""Concatenated LipSwish: :math:`[f(x), f(-x)] / 1.004` along dim 1, with
    :math:`f(x) = x\,\sigma(\beta x)/1.1` and ONE learnable :math:`b` shared by both halves
    (:math:`\beta = \mathrm{softplus}(b)`, :math:`b` starts at 0.5). Lipschitz constant 0.99997.
    """

    concatenates: bool = True
    lipschitz_constant: float = 0.99997
    halves: int = 2
    scale: float = 1.004

    def forward_with_beta(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        _check_concat_input(x, "CLipSwish")
        return torch.cat([_lipswish(x, beta), _lipswish(-x, beta)], dim=1) / self.scale

    def derivative_with_beta(self, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        r""":math:`[f'(x), -f'(-x)] / 1.004` along dim 1."""
        _check_concat_input(x, "CLipSwish")
        first = _lipswish_derivative(x, beta)
        second = -_lipswish_derivative(-x, beta)
        return torch.cat([first, second], dim=1) / self.scale


class CReLU(nn.Module):
    r"""Concatenated ReLU: :math:`[\mathrm{relu}(x), \mathrm{relu}(-x)]` along dim 1 (no
    parameters, 1-Lipschitz: at most one half has a nonzero slope)."""

    concatenates: bool = True
    lipschitz_constant: float = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_concat_input(x, "CReLU")
        return torch.cat([F.relu(x), F.relu(-x)], dim=1)

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`[1_{x>0}, -1_{x<0}]` along dim 1."""
        _check_concat_input(x, "CReLU")
        return torch.cat([(x > 0).to(x.dtype), -(x < 0).to(x.dtype)], dim=1)


ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "pila": Pila,
    "cpila": CPila,
    "lipswish": LipSwish,
    "clipswish": CLipSwish,
    "crelu": CReLU,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name: one of ``pila``, ``cpila``, ``lipswish``,
    ``clipswish``, ``crelu`` (case-insensitive).

    >>> make_activation("cpila").concatenates
    True
    """
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name.lower()]()

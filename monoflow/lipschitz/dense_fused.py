r"""The flat Lipschitz DenseNet in one fused kernel call: value, Jacobian and their backward.

The 2-D toy models' g (two inputs, three dense layers of 8 hidden units, CPila or CLipSwish, a last
layer back to two outputs) is about a thousand FLOPs per sample, about 0.5 MFLOP at batch 500; in
plain PyTorch one evaluation is a dozen operator dispatches, one value-and-Jacobian pass about
forty, and its backward twice that, so the 2-D steps are bound by dispatch, not by arithmetic.
:func:`monoflow.kernels.dense_forward` and :func:`~monoflow.kernels.dense_backward` compute the
whole network for a block of 64 samples at a time, with the features stored feature by feature so
that every loop runs over the block's samples. With the packed parameters
:math:`\theta = (\bar W_0, b_0, \dots, \bar W_L, b_L)` (the folded weights of
:meth:`~monoflow.lipschitz.dense.DenseNet._scaled_weights`) and the activations' constants,

* :func:`fused_value` is :math:`g(x)`, and :func:`fused_jacobian` is
  :math:`(g(x), \partial g/\partial x)`, each differentiable in x, :math:`\theta` and each CLipSwish
  :math:`\beta` (:class:`_FusedDense`);
* the backward of the pair runs in the kernel too (the slope's gradient through the activations'
  second derivatives); a backward that is itself recorded (double backward) runs
  :func:`plain_dense`, the same map in differentiable PyTorch operators.

They apply (:func:`fused_applicable`) where :func:`monoflow.kernels.applicable` holds for the input
and the network is flat (spectral-norm linear layers) with CPila or CLipSwish activations.
:func:`fused_newton` runs whole Newton starts of a resolvent solve in one call. Inside
``torch.compile`` the same kernels are torch operators (:func:`dense_operator`, its backward and
:func:`dense_newton_operator`, registered with ``torch.library``), used where a DenseNet's
``use_kernel_operators`` is set.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monoflow import kernels
from monoflow.activations import CLipSwish, CPila

__all__ = ["packable", "supported", "fused_applicable", "differentiable_call", "fused_value", "fused_jacobian", "fused_newton",
           "plain_dense", "plain_backward", "pack_parameters", "layer_parameters", "activation_value_and_slope",
           "operator_value_and_jacobian", "dense_operator", "dense_backward_operator", "dense_newton_operator"]

_KINDS = {CPila: kernels.DENSE_ACTIVATIONS["cpila"], CLipSwish: kernels.DENSE_ACTIVATIONS["clipswish"]}


_HIDDEN: dict = {}


def _hidden_tensor(hidden: Sequence[int]) -> Tensor:
    """The hidden widths as the kernels take them (int64), one tensor per architecture."""
    key = tuple(hidden)
    if key not in _HIDDEN:
        _HIDDEN[key] = torch.tensor(key, dtype=torch.int64)
    return _HIDDEN[key]


def _kind(activations: Sequence[nn.Module]) -> Optional[int]:
    """The kernel's activation code when all layers use one supported activation (exact types)."""
    kinds = {_KINDS.get(type(a)) for a in activations}
    return kinds.pop() if len(kinds) == 1 and None not in kinds else None


def packable(net: nn.Module) -> bool:
    """Whether :func:`pack_parameters` packs ``net``: flat, with dense layers and a bias in every linear map."""
    *dense, last = net.layers
    return bool(net._flat and dense and all(linear.bias is not None for linear in [layer.linear for layer in dense] + [last]))


def supported(net: nn.Module) -> bool:
    """Whether the kernels compute ``net``: a packable DenseNet whose layers all use CPila or all CLipSwish."""
    *dense, _ = net.layers
    return packable(net) and _kind([layer.activation for layer in dense]) is not None


def fused_applicable(net: nn.Module, x: Tensor) -> bool:
    """Whether :func:`fused_value` and :func:`fused_jacobian` compute ``net`` at ``x``: a flat DenseNet
    of CPila or CLipSwish layers, a (batch, d) input of the weights' dtype, and
    :func:`monoflow.kernels.applicable`."""
    if x.dim() != 2 or x.shape[0] == 0 or not net._fused_supported:
        return False
    first, last = net.layers[0], net.layers[-1]
    return x.shape[1] == first.linear.in_features and x.dtype == last.weight.dtype and kernels.applicable(x)


def pack_parameters(net: nn.Module, weights: Sequence[Tensor]) -> Tuple[Tensor, Tuple[int, ...], Tensor, Optional[int]]:
    r"""``(params, hidden, act, kind)``: the folded ``weights`` and the biases packed in one tensor
    (differentiable where they are), the hidden widths, each layer's activation constants
    (layers, 3): CPila :math:`(k, \text{shift}, 1/\text{scale})`, CLipSwish
    :math:`(\beta, 1/\text{scale}, 0)` with :math:`\beta` differentiable, zeros for other
    activations, and the kernels' activation code (``None`` where the kernels do not apply)."""
    *dense, last = net.layers
    parts: List[Tensor] = []
    for layer, weight in zip(dense, weights):
        parts += [weight.reshape(-1), layer.linear.bias]
    params = torch.cat(parts + [weights[-1].reshape(-1), last.bias])
    hidden = tuple(layer.linear.out_features for layer in dense)
    activations = [layer.activation for layer in dense]
    kind = _kind(activations)
    if kind == kernels.DENSE_ACTIVATIONS["cpila"]:
        act = torch.tensor([[a.k, a.shift, 1.0 / a.scale] for a in activations], dtype=params.dtype)
    elif kind == kernels.DENSE_ACTIVATIONS["clipswish"]:
        zero = params.new_zeros(())
        act = torch.stack([torch.stack([a.beta.to(params.dtype), zero + 1.0 / a.scale, zero]) for a in activations])
    else:
        act = params.new_zeros(len(activations), 3)
    return params, hidden, act, kind


def layer_parameters(net: nn.Module, params: Tensor) -> List[Tuple[Tensor, Tensor]]:
    """Each layer's ``(weight, bias)`` as views of the packed ``params`` (:func:`pack_parameters`)."""
    *dense, last = net.layers
    views, offset = [], 0
    for linear in [layer.linear for layer in dense] + [last]:
        rows, columns = linear.out_features, linear.in_features
        weight = params[offset:offset + rows * columns].view(rows, columns)
        offset += rows * columns
        views.append((weight, params[offset:offset + rows]))
        offset += rows
    return views


def activation_value_and_slope(activation: nn.Module, pre: Tensor, beta: Optional[Tensor] = None,
                               with_slope: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """The activation's value and, with ``with_slope``, its slope at ``pre`` (else ``None``); for
    CLipSwish-type activations at ``beta``."""
    if beta is not None:
        return activation.forward_with_beta(pre, beta), activation.derivative_with_beta(pre, beta) if with_slope else None
    if not with_slope:
        return activation(pre), None
    if hasattr(activation, "value_and_derivative"):
        return activation.value_and_derivative(pre)
    return activation(pre), activation.derivative(pre)


def plain_dense(net: nn.Module, x: Tensor, params: Tensor, act: Tensor,
                with_jacobian: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """The map of :func:`fused_jacobian` in differentiable PyTorch operators (double backward, tests)."""
    *dense, last = net.layers
    batch, width = x.shape
    features = x
    tangents = torch.eye(width, dtype=x.dtype, device=x.device).expand(batch, width, width) if with_jacobian else None
    views = layer_parameters(net, params)
    with kernels.enabled(False):
        for index, (layer, (weight, bias)) in enumerate(zip(dense, views)):
            pre = F.linear(features, weight, bias)
            activation = layer.activation
            beta = act[index, 0] if isinstance(activation, CLipSwish) else None
            value, slope = activation_value_and_slope(activation, pre, beta, with_slope=tangents is not None)
            features = torch.cat([features, value], dim=1)
            if tangents is not None:
                pre_tangents = F.linear(tangents, weight)
                if activation.concatenates:
                    pre_tangents = torch.cat([pre_tangents] * 2, dim=2)
                tangents = torch.cat([tangents, slope.unsqueeze(1) * pre_tangents], dim=2)
    weight, bias = views[-1]
    value = F.linear(features, weight, bias)
    return value, None if tangents is None else F.linear(tangents, weight).transpose(1, 2)


def plain_backward(net: nn.Module, inputs: Tuple[Tensor, Tensor, Tensor], needed: Sequence[bool], with_jacobian: bool,
                   grad_value: Optional[Tensor], grad_jac: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The gradients of ``(x, params, act)`` through :func:`plain_dense`, recorded where grad mode is on
    (a backward that is itself differentiated; the saved inputs carry their own history)."""
    x, params, act = inputs
    record = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = inputs if record else tuple(t.detach().requires_grad_(need) for t, need in zip(inputs, needed))
        value, jac = plain_dense(net, *leaves, with_jacobian)
    outputs, grads = zip(*[(o, g) for o, g in ((value, grad_value), (jac, grad_jac)) if o is not None and g is not None])
    found = iter(torch.autograd.grad(outputs, [t for t, need in zip(leaves, needed) if need], grads,
                                     create_graph=record, allow_unused=True))
    return tuple(next(found) if need else None for need in needed)


def _kernel_forward(x: Tensor, params: Tensor, act: Tensor, hidden: Sequence[int], d_out: int, kind: int,
                    with_jacobian: bool) -> Tuple[Tensor, Optional[Tensor]]:
    return kernels.dense_forward(x, params, _hidden_tensor(hidden), act, d_out, kind, with_jacobian)


def _kernel_backward(x: Tensor, grad_value: Optional[Tensor], grad_jac: Optional[Tensor], params: Tensor, act: Tensor,
                     hidden: Sequence[int], d_out: int, kind: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients of x, params and act (its column 0: each beta; the other columns are constants)."""
    grad_x, grad_params, grad_beta = kernels.dense_backward(x, grad_value, grad_jac, params, _hidden_tensor(hidden), act,
                                                            d_out, kind)
    grad_act = torch.zeros_like(act)
    grad_act[:, 0] = grad_beta
    return grad_x, grad_params.to(params.dtype), grad_act


class _FusedDense(torch.autograd.Function):
    """``g(x)`` or ``(g(x), dg/dx)`` by the kernel; backward by the kernel, or by :func:`plain_dense`
    when the backward is recorded."""

    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, act: Tensor, net: nn.Module, hidden: Tuple[int, ...],  # type: ignore[override]
                kind: int, with_jacobian: bool):
        ctx.set_materialize_grads(False)  # a Jacobian no gradient reaches: the value's backward alone
        ctx.save_for_backward(x, params, act)
        ctx.constants = (net, hidden, kind, with_jacobian)
        value, jac = _kernel_forward(x, params, act, hidden, net.layers[-1].out_features, kind, with_jacobian)
        return (value, jac) if with_jacobian else value

    @staticmethod
    def backward(ctx, grad_value: Optional[Tensor], grad_jac: Optional[Tensor] = None):  # type: ignore[override]
        x, params, act = ctx.saved_tensors
        net, hidden, kind, with_jacobian = ctx.constants
        if torch.is_grad_enabled():
            return (*plain_backward(net, (x, params, act), ctx.needs_input_grad[:3], with_jacobian, grad_value, grad_jac),
                    None, None, None, None)
        grad_x, grad_params, grad_act = _kernel_backward(x, grad_value, grad_jac, params, act, hidden,
                                                         net.layers[-1].out_features, kind)
        return grad_x, grad_params, grad_act if ctx.needs_input_grad[2] else None, None, None, None, None


Packed = Tuple[Tensor, Tuple[int, ...], Tensor, Optional[int]]


def differentiable_call(function: type, inputs: Tuple[Tensor, ...], constants: tuple, with_jacobian: bool,
                        without_graph: Callable[[], Tuple[Tensor, Optional[Tensor]]]):
    """``function.apply(*inputs, *constants, with_jacobian)`` where grad mode records a graph through one
    of the ``inputs``, else ``without_graph()``; the value, or ``(value, Jacobian)`` with ``with_jacobian``."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return function.apply(*inputs, *constants, with_jacobian)
    value, jac = without_graph()
    return (value, jac) if with_jacobian else value


def _evaluate(net: nn.Module, x: Tensor, packed: Packed, with_jacobian: bool):
    params, hidden, act, kind = packed
    return differentiable_call(_FusedDense, (x, params, act), (net, hidden, kind), with_jacobian, lambda: _kernel_forward(
        x, params, act, hidden, net.layers[-1].out_features, kind, with_jacobian))


def fused_value(net: nn.Module, x: Tensor, packed: Packed) -> Tensor:
    """``g(x)`` by the kernel with the :func:`pack_parameters` of ``net``; differentiable. Call where
    :func:`fused_applicable` holds."""
    return _evaluate(net, x, packed, False)


def fused_jacobian(net: nn.Module, x: Tensor, packed: Packed) -> Tuple[Tensor, Tensor]:
    """``(g(x), dg/dx)`` (B, d_out, d) by the kernel; differentiable."""
    return _evaluate(net, x, packed, True)


# ------------------------------------------------------------------ inside torch.compile
# The same kernels as torch operators (torch.library), so that a compiled graph calls them as
# opaque kernels: Dynamo traces their shapes from the fake implementations, AOTAutograd their
# gradients from the backward operator. Used where DenseNet.use_kernel_operators is set (by
# monoflow.compiled.CompiledFlowLoss, when the kernels are available).

@torch.library.custom_op("monoflow::dense", mutates_args=())
def dense_operator(x: Tensor, params: Tensor, act: Tensor, hidden: List[int], d_out: int, kind: int,
                   with_jacobian: bool) -> Tuple[Tensor, Tensor]:
    """``(g(x), dg/dx)`` (an empty tensor without ``with_jacobian``) by :func:`monoflow.kernels.dense_forward`."""
    value, jac = _kernel_forward(x, params, act, hidden, d_out, kind, with_jacobian)
    return value, x.new_empty(0) if jac is None else jac


@dense_operator.register_fake
def _(x, params, act, hidden, d_out, kind, with_jacobian):
    rows, d = x.shape
    return x.new_empty(rows, d_out), x.new_empty(rows, d_out, d) if with_jacobian else x.new_empty(0)


@torch.library.custom_op("monoflow::dense_backward", mutates_args=())
def dense_backward_operator(x: Tensor, grad_value: Tensor, grad_jac: Tensor, params: Tensor, act: Tensor,
                            hidden: List[int], d_out: int, kind: int,
                            with_jacobian: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients of x, params and act of :func:`dense_operator` (act: its column 0, each beta)."""
    return _kernel_backward(x, grad_value, grad_jac if with_jacobian else None, params, act, hidden, d_out, kind)


@dense_backward_operator.register_fake
def _(x, grad_value, grad_jac, params, act, hidden, d_out, kind, with_jacobian):
    return torch.empty_like(x), torch.empty_like(params), torch.empty_like(act)


def _operator_setup(ctx, inputs, output) -> None:
    x, params, act, hidden, d_out, kind, with_jacobian = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, params, act)
    ctx.constants = (hidden, d_out, kind, with_jacobian)


def _operator_backward(ctx, grad_value: Optional[Tensor], grad_jac: Optional[Tensor]):
    x, params, act = ctx.saved_tensors
    hidden, d_out, kind, with_jacobian = ctx.constants
    grad_value = x.new_zeros(x.shape[0], d_out) if grad_value is None else grad_value
    # a Jacobian that no gradient reaches (the compiled loss's Newton step holds it constant): the
    # value's backward alone, without the tangents
    jacobian_backward = with_jacobian and grad_jac is not None
    grad_jac = grad_jac if jacobian_backward else x.new_empty(0)
    grads = dense_backward_operator(x, grad_value, grad_jac, params, act, hidden, d_out, kind, jacobian_backward)
    return (*grads, None, None, None, None)


dense_operator.register_autograd(_operator_backward, setup_context=_operator_setup)


@torch.library.custom_op("monoflow::dense_newton", mutates_args=())
def dense_newton_operator(b: Tensor, params: Tensor, act: Tensor, hidden: List[int], kind: int, steps: int,
                          negative: bool) -> Tensor:
    """:func:`monoflow.kernels.dense_newton` (no gradient)."""
    return kernels.dense_newton(b, params, _hidden_tensor(hidden), act, kind, steps, -1.0 if negative else 1.0)


@dense_newton_operator.register_fake
def _(b, params, act, hidden, kind, steps, negative):
    return torch.empty_like(b)


def operator_value_and_jacobian(net: nn.Module, x: Tensor, packed: "Packed",
                                with_jacobian: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`fused_value` / :func:`fused_jacobian` through :func:`dense_operator` (compiled graphs)."""
    params, hidden, act, kind = packed
    value, jac = dense_operator(x, params, act, list(hidden), net.layers[-1].out_features, kind, with_jacobian)
    return value, jac if with_jacobian else None


def fused_newton(net: nn.Module, b: Tensor, packed: "Packed", sign: float, steps: int) -> Tensor:
    """:func:`monoflow.kernels.dense_newton` with the packed parameters; inside ``torch.compile`` through
    :func:`dense_newton_operator`."""
    params, hidden, act, kind = packed
    if torch.compiler.is_compiling():
        return dense_newton_operator(b, params, act, list(hidden), kind, steps, sign < 0)
    return kernels.dense_newton(b, params, _hidden_tensor(hidden), act, kind, steps, sign)

r"""The flat Lipschitz DenseNet on one feature buffer, with a hand-written backward.

Wide flat DenseNets (the 1-D models of Figure 4: one input, four dense layers of 64 units, CReLU,
a last layer over 513 features) are bound by their matrix products, and in plain PyTorch a good
part of a step goes to what surrounds them: each layer concatenates the growing features into a new
tensor, and autograd's backward splits each layer's input gradient and adds the pieces into every
earlier feature's gradient, one batch-sized addition per pair of layers. Here, with the packed
folded weights :math:`\theta` of :func:`~monoflow.lipschitz.dense_fused.pack_parameters`:

* the forward writes the features :math:`u = [x, a_1, a_2, \dots]` once into one buffer, each
  layer's product reading a prefix of it, :math:`h_\ell = \bar W_\ell u_{<\ell} + b_\ell`; with the
  Jacobian, the tangents :math:`\partial u/\partial x` go alongside in a second buffer (one more
  product per layer), so :math:`(g(x), \partial g/\partial x)` costs about what the value and one
  vector-Jacobian product cost;
* the backward of the value runs the layers in reverse on one gradient buffer
  :math:`\bar u = \partial\mathcal L/\partial u`: :math:`\bar h_\ell = a'(h_\ell) \odot
  \bar u_\ell` (summed over a concatenating activation's two halves), :math:`\partial\mathcal
  L/\partial \bar W_\ell = \bar h_\ell^\top u_{<\ell}`, and :math:`\bar u_{<\ell} \mathrel{+}=
  \bar h_\ell \bar W_\ell` accumulated in place by the product itself.

A gradient that reaches the Jacobian, or a backward that is itself recorded, runs
:func:`~monoflow.lipschitz.dense_fused.plain_backward` (the same map in plain operators). It applies
(:func:`buffered_applicable`) to flat DenseNets whose activations have no parameters (CReLU, CPila,
Pila), on any device.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from monoflow.activations import CReLU
from monoflow.lipschitz.dense_fused import (Packed, activation_value_and_slope, differentiable_call, layer_parameters,
                                            packable, plain_backward)

__all__ = ["buffered_supported", "buffered_applicable", "buffered_value", "buffered_jacobian", "forward_on_buffers"]


def buffered_supported(net: nn.Module) -> bool:
    """Whether :func:`buffered_value` computes ``net``: packable, with activations that have no parameters."""
    *dense, _ = net.layers
    return packable(net) and all(next(layer.activation.parameters(), None) is None for layer in dense)


def buffered_applicable(net: nn.Module, x: Tensor) -> bool:
    """Whether :func:`buffered_value` and :func:`buffered_jacobian` compute ``net`` at ``x``: a supported
    network and a (batch, d) input of its width and dtype."""
    return (x.dim() == 2 and x.shape[0] > 0 and net._buffered_supported
            and x.shape[1] == net.layers[0].linear.in_features and x.dtype == net.layers[-1].weight.dtype)


def _affine(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def forward_on_buffers(net: nn.Module, x: Tensor, views: Sequence[Tuple[Tensor, Tensor]], with_jacobian: bool = False,
                       keep_states: bool = False) -> Tuple[Tensor, Optional[Tensor], Tensor, List[Tensor]]:
    r"""``(g(x), dg/dx or None, features u, states)`` with each layer's ``(weight, bias)`` in ``views``,
    without autograd, for any activation (a slope only where the tangents or ``keep_states`` need it).
    A layer's state is what its backward needs: the masks of :math:`h_\ell > 0` and :math:`h_\ell < 0`
    for CReLU, the slope :math:`a'(h_\ell)` otherwise; ``[]`` without ``keep_states``."""
    *dense, last = net.layers
    batch, dim = x.shape
    features = x.new_empty(batch, last.in_features)
    features[:, :dim] = x
    tangents = None
    if with_jacobian:  # rows i * batch + b: the derivatives in x_i at sample b
        tangents = x.new_empty(dim * batch, last.in_features)
        tangents.view(dim, batch, -1)[:, :, :dim] = torch.eye(dim, dtype=x.dtype, device=x.device).unsqueeze(1)
    states = []
    width = dim
    for layer, (weight, bias) in zip(dense, views):
        activation = layer.activation
        pre = _affine(features[:, :width], weight, bias)
        pre_tangents = None if tangents is None else torch.mm(tangents[:, :width], weight.t()).view(dim, batch, -1)
        if type(activation) is CReLU:  # [relu(h), relu(-h)] written in place; its slopes as two 0/1 masks
            added = 2 * pre.shape[1]
            half = width + added // 2
            torch.clamp_min(pre, 0.0, out=features[:, width:half])
            torch.clamp_max(pre, 0.0, out=features[:, half:width + added]).neg_()
            if pre_tangents is not None or keep_states:
                positive, negative = (pre > 0).to(pre.dtype), (pre < 0).to(pre.dtype)
                if pre_tangents is not None:
                    out = tangents.view(dim, batch, -1)  # type: ignore[union-attr]
                    torch.mul(pre_tangents, positive, out=out[:, :, width:half])
                    torch.mul(pre_tangents, negative, out=out[:, :, half:width + added]).neg_()
                if keep_states:
                    states.append(torch.stack([positive, negative]))
        else:
            value, slope = activation_value_and_slope(activation, pre, with_slope=pre_tangents is not None or keep_states)
            added = value.shape[1]
            features[:, width:width + added] = value
            if pre_tangents is not None:
                if activation.concatenates:
                    pre_tangents = pre_tangents.repeat(1, 1, 2)
                torch.mul(pre_tangents, slope, out=tangents.view(dim, batch, -1)[:, :, width:width + added])  # type: ignore[union-attr]
            if keep_states:
                states.append(slope)
        width += added
    weight, bias = views[-1]
    value = _affine(features, weight, bias)
    jac = None if tangents is None else torch.mm(tangents, weight.t()).view(dim, batch, -1).permute(1, 2, 0)
    return value, jac, features, states


def _backward(net: nn.Module, params: Tensor, features: Tensor, states: List[Tensor], grad_value: Tensor,
              dim: int) -> Tuple[Tensor, Tensor]:
    """The gradients of x and of the packed parameters from the value's gradient."""
    *dense, _ = net.layers
    views = layer_parameters(net, params)
    grad_params = torch.empty_like(params)
    grad_views = layer_parameters(net, grad_params)
    batch, total = features.shape
    # the pre-activation gradients, last layer first, and the weights stacked in the same order (each
    # layer's rows zero beyond the features it reads): the gradient of features block j is then one
    # product, of the gradients of the layers after j with their weights' columns j
    rows = [weight.shape[0] for weight, _ in views]
    grad_pre = features.new_empty(batch, sum(rows))
    stacked = params.new_zeros(sum(rows), total)
    start = 0
    for (weight, _), count in zip(reversed(views), reversed(rows)):
        stacked[start:start + count, :weight.shape[1]] = weight
        start += count
    grad_pre[:, :rows[-1]] = grad_value
    grad_weight, grad_bias = grad_views[-1]
    torch.mm(grad_value.t(), features, out=grad_weight)
    torch.sum(grad_value, 0, out=grad_bias)
    end, width = rows[-1], total
    for layer, (grad_weight, grad_bias), state, count in zip(reversed(dense), reversed(grad_views[:-1]),
                                                             reversed(states), reversed(rows[:-1])):
        crelu = type(layer.activation) is CReLU
        added = 2 * state.shape[2] if crelu else state.shape[1]
        width -= added
        delta = torch.mm(grad_pre[:, :end], stacked[:end, width:width + added])
        half = added // 2
        if crelu:  # the state: the masks of h > 0 and h < 0
            delta = delta[:, :half] * state[0] - delta[:, half:] * state[1]
        else:
            delta.mul_(state)
            if layer.activation.concatenates:
                delta = delta[:, :half] + delta[:, half:]
        grad_pre[:, end:end + count] = delta
        torch.mm(delta.t(), features[:, :width], out=grad_weight)
        torch.sum(delta, 0, out=grad_bias)
        end += count
    return torch.mm(grad_pre, stacked[:, :dim]), grad_params


class _BufferedDense(torch.autograd.Function):
    """``g(x)`` or ``(g(x), dg/dx)`` on the feature buffer; the value's backward by :func:`_backward`."""

    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, act: Tensor, net: nn.Module,  # type: ignore[override]
                with_jacobian: bool):
        ctx.set_materialize_grads(False)  # a Jacobian that no gradient reaches: the value's backward alone
        value, jac, features, states = forward_on_buffers(net, x, layer_parameters(net, params), with_jacobian,
                                                          keep_states=True)
        ctx.save_for_backward(x, params, act, features, *states)
        ctx.constants = (net, with_jacobian)
        return (value, jac) if with_jacobian else value

    @staticmethod
    def backward(ctx, grad_value: Optional[Tensor], grad_jac: Optional[Tensor] = None):  # type: ignore[override]
        x, params, act, features, *states = ctx.saved_tensors
        net, with_jacobian = ctx.constants
        needed = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() or grad_jac is not None:
            return (*plain_backward(net, (x, params, act), needed, with_jacobian, grad_value, grad_jac), None, None)
        if grad_value is None:
            return None, None, None, None, None
        grad_x, grad_params = _backward(net, params, features, states, grad_value, x.shape[1])
        return grad_x if needed[0] else None, grad_params if needed[1] else None, None, None, None


def _evaluate(net: nn.Module, x: Tensor, packed: Packed, with_jacobian: bool):
    params, _, act, _ = packed
    return differentiable_call(_BufferedDense, (x, params, act), (net,), with_jacobian,
                               lambda: forward_on_buffers(net, x, layer_parameters(net, params), with_jacobian)[:2])


def buffered_value(net: nn.Module, x: Tensor, packed: Packed) -> Tensor:
    """``g(x)`` on the feature buffer with the packed parameters of ``net``; differentiable. Call where
    :func:`buffered_applicable` holds."""
    return _evaluate(net, x, packed, False)


def buffered_jacobian(net: nn.Module, x: Tensor, packed: Packed) -> Tuple[Tensor, Tensor]:
    """``(g(x), dg/dx)`` (B, d_out, d) on the feature buffers; differentiable."""
    return _evaluate(net, x, packed, True)

"""The Lipschitz DenseNet (i-DenseNet): dense layers with learnable concatenation, the network
g built from them (with the folded-weights fast path for flat inputs), its builders and the
switch that makes the concatenation scales learnable."""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from monoflow.activations import make_activation
from monoflow.lipschitz.chain import _propagate_jacobian
from monoflow.lipschitz.dense_buffered import (buffered_applicable, buffered_jacobian, buffered_supported, buffered_value,
                                               forward_on_buffers)
from monoflow.lipschitz.dense_fused import (fused_applicable, fused_jacobian, fused_newton, fused_value,
                                            operator_value_and_jacobian, pack_parameters)
from monoflow.lipschitz.dense_fused import supported as fused_supported
from monoflow.lipschitz.parameter_reuse import _version_key, pass_records_graph, reused_transform
from monoflow.lipschitz.spectral_norm import SpectralNormConv2d, SpectralNormLinear
from monoflow.lipschitz.validation import _check_coeff, _check_positive_int

__all__ = ["ActivationSpec", "LipschitzDenseLayer", "DenseNet", "dense_layer_output", "dense_mlp", "dense_convnet", "set_learnable_concat"]

ActivationSpec = Union[str, Callable[[], nn.Module]]


def _resolve_activation_factory(activation: ActivationSpec) -> Callable[[], nn.Module]:
    if isinstance(activation, str):
        make_activation(activation)  # raises ValueError for unknown names
        return lambda: make_activation(activation)
    if callable(activation):
        return activation
    raise ValueError(f"activation must be a name or a factory returning a module, got {activation!r}")


def _check_activation_interface(module: nn.Module) -> None:
    missing = [name for name in ("concatenates", "lipschitz_constant", "derivative")
               if not hasattr(module, name)]
    if missing:
        raise ValueError(
            f"activation {type(module).__name__} lacks {missing}; see monoflow.activations for "
            "the interface (concatenates, lipschitz_constant, derivative)"
        )


def _scale(eta: Union[torch.Tensor, float], t: torch.Tensor) -> torch.Tensor:
    """``eta * t`` for a scalar eta, or one eta per row (shape (rows, 1)) against t (rows, ...)."""
    if isinstance(eta, torch.Tensor) and eta.dim() > 0:
        return eta.view((eta.shape[0],) + (1,) * (t.dim() - 1)) * t
    if not isinstance(eta, torch.Tensor) and eta == 1.0:
        return t
    return eta * t


def dense_layer_output(
    activation: nn.Module,
    x: torch.Tensor,
    pre: torch.Tensor,
    eta1: Union[torch.Tensor, float],
    eta2: Union[torch.Tensor, float],
    jac: Optional[torch.Tensor] = None,
    pre_jac: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""The dense layer after its linear map: :math:`[\eta_1 x,\ \eta_2\, a(h)]` along dim 1 for
    the pre-activation :math:`h` = ``pre``, and with the transposed Jacobians ``jac`` of x and
    ``pre_jac`` of h (B, d, channels) also :math:`[\eta_1 J,\ \eta_2\, a'(h) \odot J_h]` along
    dim 2 (else ``None``). ``eta1``, ``eta2`` are scalars or one value per row (rows, 1); ``beta``
    (LipSwish-type activations only) overrides the activation's own parameter, per row."""
    if beta is not None:
        value = activation.forward_with_beta(pre, beta)
        slope = None if jac is None else activation.derivative_with_beta(pre, beta)
    elif jac is None:
        value, slope = activation(pre), None
    elif hasattr(activation, "value_and_derivative"):
        value, slope = activation.value_and_derivative(pre)
    else:
        value, slope = activation(pre), activation.derivative(pre)
    out = torch.cat([_scale(eta1, x), _scale(eta2, value)], dim=1)
    if jac is None:
        return out, None
    if activation.concatenates:
        pre_jac = torch.cat([pre_jac, pre_jac], dim=2)
    return out, torch.cat([_scale(eta1, jac), _scale(eta2, slope.unsqueeze(1) * pre_jac)], dim=2)


class LipschitzDenseLayer(nn.Module):
    r"""Dense (concatenating) layer :math:`x \mapsto [\eta_1 x,\ \eta_2\, a(\mathrm{layer}(x))]`
    along dim 1, with :math:`\eta_i = \mathrm{softplus}(K_i) + 0.1` rescaled to
    :math:`\|(\eta_1,\eta_2)\|_2 =` ``lip_coeff``.

    ``K_1, K_2`` are scalar parameters starting at 1. While ``learnable_concat`` is False (the
    default; switch with :func:`set_learnable_concat`) the forward uses the value at
    :math:`K = 1` for both, so no gradient reaches them. The flag is not saved in the
    state dict: set it again after loading a checkpoint.
    """

    def __init__(self, linear: nn.Module, activation: nn.Module, lip_coeff: float = 0.98) -> None:
        super().__init__()
        _check_activation_interface(activation)
        self.linear = linear
        self.activation = activation
        self.lip_coeff = _check_coeff(lip_coeff, "lip_coeff")
        self.K1 = nn.Parameter(torch.tensor(1.0))
        self.K2 = nn.Parameter(torch.tensor(1.0))
        self.learnable_concat = False

    def etas(self) -> Tuple[Union[torch.Tensor, float], Union[torch.Tensor, float]]:
        r"""The scales :math:`(\eta_1, \eta_2)` with norm ``lip_coeff``."""
        if not self.learnable_concat:
            # softplus(1) + 0.1 for both, rescaled: each is lip_coeff / sqrt(2)
            return self.lip_coeff / math.sqrt(2.0), self.lip_coeff / math.sqrt(2.0)
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            key = _version_key(self.K1, self.K2)
            cache = self.__dict__.get("_eta_cache")
            if cache is None or cache[0] != key:
                cache = (key, self._learned_etas())
                self.__dict__["_eta_cache"] = cache
            return cache[1]
        return reused_transform(self, "etas", self._learned_etas)

    def _learned_etas(self) -> Tuple[torch.Tensor, torch.Tensor]:
        eta1 = F.softplus(self.K1) + 0.1
        eta2 = F.softplus(self.K2) + 0.1
        scale = self.lip_coeff / torch.sqrt(eta1 ** 2 + eta2 ** 2)
        return eta1 * scale, eta2 * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eta1, eta2 = self.etas()
        return dense_layer_output(self.activation, x, self.linear(x), eta1, eta2)[0]

    def forward_with_jacobian(self, x: torch.Tensor, jac: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""Output and its Jacobian for flat inputs: with :math:`h = \bar W x + b`,
        :math:`\partial\,\mathrm{out} = [\eta_1 J,\ \eta_2\, a'(h) \odot (\bar W J)]` (for a
        concatenating activation, :math:`\bar W J` is repeated for both halves). ``jac`` is the
        transposed Jacobian, shape (B, d, channels)."""
        if not hasattr(self.linear, "forward_with_jacobian"):
            raise ValueError(f"{type(self.linear).__name__} does not support Jacobian propagation")
        eta1, eta2 = self.etas()
        pre, pre_jac = self.linear.forward_with_jacobian(x, jac)
        return dense_layer_output(self.activation, x, pre, eta1, eta2, jac, pre_jac)  # type: ignore[return-value]

    def _bound(self, linear_norm: float) -> float:
        with torch.no_grad():
            eta1, eta2 = (float(e) for e in self.etas())
        return math.sqrt(eta1 ** 2 + (eta2 * self.activation.lipschitz_constant * linear_norm) ** 2)

    def lipschitz_bound(self) -> float:
        r""":math:`\sqrt{\eta_1^2 + \eta_2^2 (\mathrm{Lip}(a)\,\|\bar W\|)^2}` with the layer's
        rigorous norm bound."""
        return self._bound(self.linear.lipschitz_bound())

    def lipschitz_estimate(self) -> float:
        """As :meth:`lipschitz_bound` with the power-iteration estimate of the layer norm."""
        return self._bound(self.linear.lipschitz_estimate())



class DenseNet(nn.Module):
    r"""The Lipschitz DenseNet :math:`g`: dense layers followed by a normalised layer back to the
    input width; :math:`\mathrm{Lip}(g) \le \prod_\ell \mathrm{Lip}(\ell)`.

    Build it with :func:`dense_mlp` (flat inputs) or :func:`dense_convnet` (images). A flat one with
    CPila or CLipSwish layers computes through one fused kernel per evaluation on a CPU
    (:mod:`~monoflow.lipschitz.dense_fused`); inside ``torch.compile`` it does so as torch operators
    where :attr:`use_kernel_operators` is set (:class:`~monoflow.compiled.CompiledFlowLoss` sets it).
    """

    #: inside torch.compile, call the fused kernels as torch operators (set per module, before compiling)
    use_kernel_operators: bool = False

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(layers) == 0:
            raise ValueError("DenseNet needs at least one layer")
        self.layers = nn.ModuleList(layers)
        *dense, last = self.layers
        # exact types: subclasses may change what a layer computes
        self._flat = type(last) is SpectralNormLinear and all(
            type(layer) is LipschitzDenseLayer and type(layer.linear) is SpectralNormLinear for layer in dense)
        # whether the fused kernels, or the feature buffers, compute this network, asked at every
        # evaluation: fixed, like _flat
        self._fused_supported = fused_supported(self)
        self._buffered_supported = buffered_supported(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._flat and x.dim() == 2:
            # an input that requires grad keeps the plain operators: vector-Jacobian products of g in x
            # that are differentiated again (the series log-det estimators) then share one plain graph,
            # where each recorded backward of the fused Function would rebuild it (plain_dense)
            if fused_applicable(self, x) and not (torch.is_grad_enabled() and x.requires_grad):
                return fused_value(self, x, self._fused_parameters(x.shape[1]))
            if self._kernel_operators(x):
                return operator_value_and_jacobian(self, x, self._fused_parameters(x.shape[1]), False)[0]
            if not torch.is_grad_enabled():
                return self._forward_into_buffer(x)
            if buffered_applicable(self, x) and not x.requires_grad and not torch.compiler.is_compiling():
                return buffered_value(self, x, self._fused_parameters(x.shape[1]))
            return self._forward_folded(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        r"""The same map with autograd, the scales folded into the weights as in
        :meth:`_forward_into_buffer`: the features :math:`u = [x, a_1, a_2, \dots]` are concatenated
        unscaled, so no batch-sized feature (or its gradient) is multiplied by an :math:`\eta`;
        the :math:`\eta`'s gradients come from weight-sized products."""
        *dense, last = self.layers
        weights = self._folded_weights(x.shape[1])
        features = x
        for layer, weight in zip(dense, weights):
            features = torch.cat([features, layer.activation(F.linear(features, weight, layer.linear.bias))], dim=1)
        return F.linear(features, weights[-1], last.bias)

    def _fused_parameters(self, width: int) -> Tuple[torch.Tensor, Tuple[int, ...], torch.Tensor, int]:
        """The packed parameters of :mod:`~monoflow.lipschitz.dense_fused`, once per flow pass: the
        folded weights with autograd where it is on (graph evaluations), else the cached ones."""
        eager_no_grad = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        return reused_transform(self, ("fused_parameters", width, eager_no_grad), lambda: pack_parameters(
            self, (self._column_scaled_weights if eager_no_grad else self._folded_weights)(width)))

    def _folded_weights(self, width: int) -> List[torch.Tensor]:
        """:meth:`_scaled_weights` with autograd, computed once per flow pass
        (:func:`~monoflow.lipschitz.reuse_parameter_transforms`): the graph evaluation at a solution
        and the log-det's Jacobian pass share them."""
        return reused_transform(self, ("folded_weights", width, torch.is_grad_enabled()),
                                lambda: self._scaled_weights(width))

    def _forward_into_buffer(self, x: torch.Tensor) -> torch.Tensor:
        r"""The same map without autograd (fixed-point solves), without copying features: the
        input of layer :math:`\ell` is :math:`\mathrm{diag}(s_\ell)\, u` for the unscaled features
        :math:`u = [x, a_1, a_2, \dots]`, written once into one buffer, and the column scales
        :math:`s_\ell` (products of the :math:`\eta`'s) are folded into the weights,
        :math:`\bar W_\ell\, \mathrm{diag}(s_\ell)`, cached until a parameter changes
        (:func:`~monoflow.lipschitz.dense_buffered.forward_on_buffers`)."""
        *dense, last = self.layers
        biases = [layer.linear.bias for layer in dense] + [last.bias]
        return forward_on_buffers(self, x, list(zip(self._column_scaled_weights(x.shape[1]), biases)))[0]

    def _column_scaled_weights(self, width: int) -> List[torch.Tensor]:
        r""":meth:`_scaled_weights` without autograd, cached until a parameter changes; within a flow
        pass (:func:`~monoflow.lipschitz.reuse_parameter_transforms`, where parameters cannot
        change) the cache's version check runs once, not at every evaluation of a solve."""
        return reused_transform(self, ("column_scaled_weights", width),
                                lambda: self._pass_column_scaled_weights(width))

    def _pass_column_scaled_weights(self, width: int) -> List[torch.Tensor]:
        """In a pass that records a graph (training), the differentiable weights that its graph
        evaluations will use, computed here once and detached; otherwise the cached ones."""
        if pass_records_graph():
            with torch.enable_grad():
                return [weight.detach() for weight in self._folded_weights(width)]
        return self._checked_column_scaled_weights(width)

    def _checked_column_scaled_weights(self, width: int) -> List[torch.Tensor]:
        *dense, last = self.layers
        linears = [layer.linear for layer in dense] + [last]
        key = (width, tuple(layer.learnable_concat for layer in dense),
               _version_key(*[t for linear in linears for t in (linear.weight, linear.u, linear.v)],
                            *[k for layer in dense for k in (layer.K1, layer.K2)]))
        cache = self.__dict__.get("_scaled_weight_cache")
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            weights = self._scaled_weights(width)
        self.__dict__["_scaled_weight_cache"] = (key, weights)
        return weights

    def _scaled_weights(self, width: int) -> List[torch.Tensor]:
        r""":math:`\bar W_\ell\, \mathrm{diag}(s_\ell)` for every layer, where :math:`s_\ell` scales the
        unscaled features :math:`u = [x, a_1, a_2, \dots]` that layer :math:`\ell` reads (products of
        the :math:`\eta`'s; see :meth:`_forward_into_buffer`). Differentiable: the gradients of the
        :math:`\eta`'s then come from weight-sized tensors instead of batch-sized features."""
        *dense, last = self.layers
        linears = [layer.linear for layer in dense] + [last]
        scales = last.weight.new_ones(width)
        weights = []
        for index, linear in enumerate(linears):
            weights.append(linear.normalized_weight() * scales)
            if index < len(dense):
                eta1, eta2 = dense[index].etas()
                added = linears[index + 1].in_features - scales.numel()
                scales = torch.cat([scales * eta1, scales.new_ones(added) * eta2])
        return weights

    def jacobian(self, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""``(g(w), J)`` for ``w`` of shape (B, d), with ``J[b] = dg/dw`` at ``w[b]`` of shape
        (B, d, d), by forward propagation of the Jacobian through the layers (ordinary
        differentiable ops, so it can be trained through)."""
        if w.dim() != 2:
            raise ValueError(f"DenseNet.jacobian expects flat inputs (B, d), got shape {tuple(w.shape)}")
        for layer in self.layers:
            if not hasattr(layer, "forward_with_jacobian"):
                raise ValueError(
                    f"DenseNet.jacobian needs flat (linear) layers; {type(layer).__name__} has no "
                    "forward_with_jacobian"
                )
        if not self._flat:
            return _propagate_jacobian(self.layers, w)
        if fused_applicable(self, w):
            return fused_jacobian(self, w, self._fused_parameters(w.shape[1]))
        if self._kernel_operators(w):
            return operator_value_and_jacobian(self, w, self._fused_parameters(w.shape[1]), True)  # type: ignore[return-value]
        if not torch.is_grad_enabled() and buffered_applicable(self, w) and not torch.compiler.is_compiling():
            return buffered_jacobian(self, w, self._fused_parameters(w.shape[1]))
        # the eta's folded into the next layers' weights (see _scaled_weights): no rescaling of
        # batch-sized features and Jacobians, and cheap gradients for learnable concatenation
        eager_no_grad = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        weights = (self._column_scaled_weights if eager_no_grad else self._folded_weights)(w.shape[1])
        *dense, last = self.layers
        batch, dim = w.shape
        jac = torch.eye(dim, dtype=w.dtype, device=w.device).expand(batch, dim, dim)  # transposed, (B, d, channels)
        x = w
        for layer, weight in zip(dense, weights):
            pre, pre_jac = F.linear(x, weight, layer.linear.bias), F.linear(jac, weight)
            x, jac = dense_layer_output(layer.activation, x, pre, 1.0, 1.0, jac, pre_jac)
        return F.linear(x, weights[-1], last.bias), F.linear(jac, weights[-1]).transpose(1, 2)

    def value_and_detached_jacobian(self, w: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        r"""``(g(w), dg/dw)`` with the value differentiable and the Jacobian detached, in one pass that
        costs about a value and one vector-Jacobian product (the fused kernel, or the feature buffers of
        :mod:`~monoflow.lipschitz.dense_buffered`, whose backward then runs without the tangents); ``None``
        where neither applies. The direct adjoint of a solve takes its Jacobian from here."""
        if torch.compiler.is_compiling():
            return None
        if fused_applicable(self, w):
            value, jac = fused_jacobian(self, w, self._fused_parameters(w.shape[1]))
        elif buffered_applicable(self, w):
            value, jac = buffered_jacobian(self, w, self._fused_parameters(w.shape[1]))
        else:
            return None
        return value, jac.detach()

    def fused_newton(self, b: torch.Tensor, sign: float, steps: int) -> Optional[torch.Tensor]:
        r"""``steps`` Newton steps for :math:`z + s\,g(z) = b` from :math:`z = b` in one fused kernel call
        (:func:`monoflow.kernels.dense_newton`; no autograd), or ``None`` where it does not apply (not
        one or two dimensions, or :func:`~monoflow.lipschitz.dense_fused.fused_applicable` fails)."""
        if torch.is_grad_enabled() or b.dim() != 2 or b.shape[1] > 2 or self.layers[-1].out_features != b.shape[1] \
                or not (fused_applicable(self, b) or self._kernel_operators(b)):
            return None
        return fused_newton(self, b, self._fused_parameters(b.shape[1]), sign, steps)

    def _kernel_operators(self, x: torch.Tensor) -> bool:
        """Inside ``torch.compile`` with :attr:`use_kernel_operators` set: the fused kernels as torch
        operators (:func:`~monoflow.lipschitz.dense_fused.dense_operator`)."""
        return self.use_kernel_operators and torch.compiler.is_compiling() and x.dim() == 2

    def lipschitz_bound(self) -> float:
        """Certified upper bound of Lip(g): product of the layers' rigorous bounds."""
        return math.prod(layer.lipschitz_bound() for layer in self.layers)

    def lipschitz_estimate(self) -> float:
        """Product of the layers' bounds using the power-iteration estimates of the norms."""
        return math.prod(layer.lipschitz_estimate() for layer in self.layers)


def _dense_layers(
    width: int,
    depth: int,
    growth: int,
    activation: ActivationSpec,
    make_layer: Callable[[int, int], nn.Module],
    lip_coeff: float,
) -> Tuple[List[nn.Module], int]:
    _check_positive_int(depth, "depth", allow_zero=True)
    _check_positive_int(growth, "growth")
    factory = _resolve_activation_factory(activation)
    layers: List[nn.Module] = []
    channels = width
    for _ in range(depth):
        act = factory()
        _check_activation_interface(act)
        if act.concatenates and growth % 2:
            raise ValueError(f"growth must be even with a concatenating activation, got {growth}")
        out = growth // 2 if act.concatenates else growth
        layers.append(LipschitzDenseLayer(make_layer(channels, out), act, lip_coeff))
        channels += growth
    return layers, channels


def dense_mlp(
    dim: int,
    depth: int,
    growth: int,
    activation: ActivationSpec = "cpila",
    coeff: float = 0.97,
    lip_coeff: float = 0.98,
) -> DenseNet:
    r"""i-DenseNet :math:`g: \mathbb{R}^{d} \to \mathbb{R}^{d}` for flat inputs (B, dim).

    ``depth`` dense layers, each adding ``growth`` channels (its linear map outputs
    ``growth // 2`` channels with a concatenating activation, ``growth`` otherwise), then a
    :class:`SpectralNormLinear` back to ``dim``. Each layer gets its own activation instance.

    >>> sum(p.numel() for p in dense_mlp(2, 3, 16, "cpila").parameters())
    564
    """
    _check_positive_int(dim, "dim")
    layers, channels = _dense_layers(
        dim, depth, growth, activation, lambda i, o: SpectralNormLinear(i, o, coeff=coeff), lip_coeff
    )
    layers.append(SpectralNormLinear(channels, dim, coeff=coeff))
    return DenseNet(layers)


def dense_convnet(
    channels: int,
    depth: int,
    growth: int,
    activation: ActivationSpec = "cpila",
    coeff: float = 0.98,
    lip_coeff: float = 0.98,
    kernel_size: int = 3,
    final_kernel_size: int = 1,
    input_size: Optional[Tuple[int, int]] = None,
) -> DenseNet:
    r"""i-DenseNet :math:`g` for images (B, channels, H, W): ``depth`` dense layers of
    ``kernel_size`` spectral-normalised convolutions (same padding), then a
    ``final_kernel_size`` convolution back to ``channels``. Power-iteration buffers are created
    at the first forward unless ``input_size`` (H, W) is given."""
    _check_positive_int(channels, "channels")
    _check_positive_int(kernel_size, "kernel_size")
    _check_positive_int(final_kernel_size, "final_kernel_size")

    def conv(i: int, o: int, k: int) -> SpectralNormConv2d:
        return SpectralNormConv2d(i, o, k, coeff=coeff, input_size=input_size)

    layers, width = _dense_layers(
        channels, depth, growth, activation, lambda i, o: conv(i, o, kernel_size), lip_coeff
    )
    layers.append(conv(width, channels, final_kernel_size))
    return DenseNet(layers)


def set_learnable_concat(model: nn.Module, flag: bool) -> int:
    """Make the concatenation scales ``K_1, K_2`` of every dense layer in ``model`` learnable
    (``flag=True``) or hold them at their initial value. Returns the number of layers switched."""
    count = 0
    for module in model.modules():
        if isinstance(module, LipschitzDenseLayer):
            module.learnable_concat = bool(flag)
            count += 1
    return count

r"""Spectral normalisation of linear layers and convolutions: a weight :math:`W` is used as
:math:`W / \max(1, \sigma / c)`, :math:`\sigma` from persistent power-iteration vectors (updated
outside the forward pass, by :func:`monoflow.lipschitz.update_lipschitz`)."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from monoflow.lipschitz.conv_norm import conv_operator_norm_bound, conv_operator_norm_exact
from monoflow.lipschitz.parameter_reuse import _version_key, reused_transform
from monoflow.lipschitz.validation import _check_coeff, _check_positive_int, _pair

__all__ = ["SpectralNormLayer", "SpectralNormLinear", "SpectralNormConv2d"]

_DEFAULT_TOL = 1e-3


def _normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm().clamp(min=eps)


class SpectralNormLayer(nn.Module):
    r"""Shared machinery of spectrally normalised layers: power iteration on a linear operator
    :math:`A` (given by :meth:`_operator` and its adjoint :meth:`_adjoint`) with persistent
    buffers ``u`` (output side) and ``v`` (input side), and the scaling
    :math:`W / \max(1, \sigma/c)`, :math:`\sigma = u^\top A v`."""

    coeff: float
    weight: nn.Parameter
    u: torch.Tensor
    v: torch.Tensor

    def _operator(self, weight: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _adjoint(self, weight: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def has_power_iteration_state(self) -> bool:
        """False only for a convolution that has not yet seen an input (buffers not created)."""
        return self.v.numel() > 0

    def _sigma(self, weight: torch.Tensor) -> torch.Tensor:
        # clones: a later in-place power iteration must not invalidate saved autograd tensors
        return torch.sum(self.u.clone() * self._operator(weight, self.v.clone()))

    def sigma_estimate(self) -> float:
        r"""Current power-iteration estimate :math:`u^\top W v` of the *unnormalised* norm."""
        self._require_state()
        with torch.no_grad():
            return float(self._sigma(self.weight))

    def normalized_weight(self) -> torch.Tensor:
        r""":math:`W / \max(1, \sigma / c)`; differentiable in :math:`W` (u, v constant).

        Without autograd (inside fixed-point solves) the result is cached until ``weight``,
        ``u`` or ``v`` change (tracked by their version counters)."""
        self._require_state()
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return reused_transform(self, "normalized_weight", self._differentiable_normalized_weight)
        key = _version_key(self.weight, self.u, self.v)
        cache = self.__dict__.get("_normalized_cache")
        if cache is None or cache[0] != key:
            sigma = self._sigma(self.weight)
            cache = (key, self.weight / torch.clamp(sigma / self.coeff, min=1.0))
            self.__dict__["_normalized_cache"] = cache
        return cache[1]

    def _differentiable_normalized_weight(self) -> torch.Tensor:
        sigma = self._sigma(self.weight)
        return self.weight / torch.clamp(sigma / self.coeff, min=1.0)

    def _require_state(self) -> None:
        if not self.has_power_iteration_state():
            raise RuntimeError(
                f"{type(self).__name__} has no power-iteration state yet: run a forward pass "
                "first (or pass input_size) so the input size is known"
            )

    @torch.no_grad()
    def power_iteration(
        self,
        n_iterations: Optional[int] = None,
        tol: Optional[float] = None,
        max_iterations: int = 200,
    ) -> int:
        r"""Update ``u`` and ``v`` in place by power iteration on :math:`A^\top A`.

        - ``n_iterations`` only: run exactly that many iterations;
        - ``tol`` only: stop when the relative change of :math:`\sigma` is below ``tol``, at
          most ``max_iterations``;
        - both: stop at ``tol`` or after ``n_iterations``; neither: ``tol=1e-3``.

        Returns the number of iterations run.
        """
        self._require_state()
        if n_iterations is not None:
            _check_positive_int(n_iterations, "n_iterations", allow_zero=True)
        if tol is not None and not (float(tol) > 0):
            raise ValueError(f"tol must be positive, got {tol}")
        _check_positive_int(max_iterations, "max_iterations")
        if n_iterations is None and tol is None:
            tol = _DEFAULT_TOL
        limit = n_iterations if n_iterations is not None else max_iterations
        weight = self.weight.detach()
        if tol is None:  # a fixed number of iterations: no norms read back (cheap on small layers)
            u, v = self.u, self.v
            for _ in range(limit):
                v = _normalize(self._adjoint(weight, u))
                u = _normalize(self._operator(weight, v))
            self.v.copy_(v)
            self.u.copy_(u)
            return limit
        sigma_old = float(torch.sum(self.u * self._operator(weight, self.v)))
        for iteration in range(1, limit + 1):
            v = _normalize(self._adjoint(weight, self.u))
            image = self._operator(weight, v)
            sigma = float(image.norm())
            self.v.copy_(v)
            self.u.copy_(_normalize(image))
            if abs(sigma - sigma_old) <= tol * max(abs(sigma), 1e-30):
                return iteration
            sigma_old = sigma
        return limit

    def lipschitz_bound(self) -> float:
        """Rigorous upper bound of the normalised layer's operator norm (independent of u, v)."""
        raise NotImplementedError

    def lipschitz_estimate(self) -> float:
        r"""Power-iteration estimate of the normalised layer's norm: :math:`\sigma/\max(1,\sigma/c)`."""
        sigma = self.sigma_estimate()
        return sigma / max(1.0, sigma / self.coeff)


class SpectralNormLinear(SpectralNormLayer):
    r"""Linear layer :math:`y = \bar W x + b` with :math:`\bar W = W / \max(1, \sigma/c)`.

    Parameters ``weight`` (out, in) and ``bias`` (out) are initialised like ``nn.Linear``;
    buffers ``u`` (out) and ``v`` (in) are unit power-iteration vectors, converged to relative
    tolerance 1e-3 at construction so a fresh layer is already constrained.

    >>> layer = SpectralNormLinear(3, 4, coeff=0.9)
    >>> bool(torch.linalg.matrix_norm(layer.normalized_weight().detach(), 2) < 0.91)
    True
    """

    def __init__(self, in_features: int, out_features: int, coeff: float = 0.97, bias: bool = True) -> None:
        super().__init__()
        self.in_features = _check_positive_int(in_features, "in_features")
        self.out_features = _check_positive_int(out_features, "out_features")
        self.coeff = _check_coeff(coeff, "coeff")
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()
        v = _normalize(torch.randn(in_features))
        self.register_buffer("v", v)
        self.register_buffer("u", _normalize(self.weight.detach() @ v))
        self.power_iteration(tol=_DEFAULT_TOL)

    def reset_parameters(self) -> None:
        # the nn.Linear initialisation: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _operator(self, weight: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return weight @ v

    def _adjoint(self, weight: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return weight.t() @ u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def forward_with_jacobian(self, x: torch.Tensor, jac_t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(\bar W x + b,\ (\bar W J)^\top)` for ``x`` (B, in) and the *transposed*
        Jacobian ``jac_t`` (B, d, in): one matrix product for the whole batch."""
        weight = self.normalized_weight()
        return F.linear(x, weight, self.bias), F.linear(jac_t, weight)

    def lipschitz_bound(self) -> float:
        """Exact spectral norm of the normalised weight (float64 singular values)."""
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(self.normalized_weight().double(), 2))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"coeff={self.coeff}, bias={self.bias is not None}")


class SpectralNormConv2d(SpectralNormLayer):
    r"""2-D convolution with weight :math:`W / \max(1, \sigma/c)`, :math:`\sigma` the norm of the
    convolution operator at the layer's input size, by power iteration with ``conv2d`` and
    ``conv_transpose2d``.

    Buffers ``u`` (1, C_out, H', W') and ``v`` (1, C_in, H, W) are created on the first forward
    (or at construction when ``input_size`` is given) and converged to relative tolerance 1e-3;
    later inputs must have the same spatial size (``ValueError`` otherwise). Before the buffers
    exist, :meth:`power_iteration`, :meth:`normalized_weight` and :meth:`lipschitz_bound` raise
    ``RuntimeError``; :func:`update_lipschitz` skips the layer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, int]],
        stride: int = 1,
        padding: Optional[Union[int, Tuple[int, int]]] = None,
        coeff: float = 0.97,
        bias: bool = True,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive_int(in_channels, "in_channels")
        self.out_channels = _check_positive_int(out_channels, "out_channels")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        if min(self.kernel_size) < 1:
            raise ValueError(f"kernel_size must be positive, got {kernel_size!r}")
        self.stride = _check_positive_int(stride, "stride")
        self.padding = _pair(
            padding if padding is not None else (self.kernel_size[0] // 2, self.kernel_size[1] // 2),
            "padding",
        )
        self.coeff = _check_coeff(coeff, "coeff")
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()
        self.input_size: Optional[Tuple[int, int]] = None
        self._output_padding = (0, 0)
        self.register_buffer("u", torch.empty(0))
        self.register_buffer("v", torch.empty(0))
        if input_size is not None:
            self._create_state(_pair(input_size, "input_size"))

    def reset_parameters(self) -> None:
        # the nn.Conv2d initialisation
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _output_size(self, input_size: Tuple[int, int]) -> Tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (n + 2 * p - k) // self.stride + 1
            for n, p, k in zip(input_size, self.padding, self.kernel_size)
        )

    def _set_size(self, input_size: Tuple[int, int]) -> Tuple[int, int]:
        output_size = self._output_size(input_size)
        if min(output_size) < 1:
            raise ValueError(
                f"input size {input_size} is too small for kernel {self.kernel_size} with "
                f"padding {self.padding}"
            )
        self.input_size = (int(input_size[0]), int(input_size[1]))
        # conv_transpose2d must map the output grid back onto exactly the input grid
        self._output_padding = tuple(  # type: ignore[assignment]
            n - ((m - 1) * self.stride - 2 * p + k)
            for n, m, p, k in zip(input_size, output_size, self.padding, self.kernel_size)
        )
        return output_size

    def _create_state(self, input_size: Tuple[int, int]) -> None:
        self._set_size(input_size)
        weight = self.weight.detach()
        # inference_mode(False): buffers made during an inference-mode pass must stay updatable
        with torch.inference_mode(False), torch.no_grad():
            v = _normalize(torch.randn(1, self.in_channels, *input_size, dtype=weight.dtype,
                                       device=weight.device))
            self.v = v
            self.u = _normalize(self._operator(weight, v))
            self.power_iteration(tol=_DEFAULT_TOL)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # type: ignore[override]
        # buffers are created lazily: adopt the saved input size before loading them
        saved_v = state_dict.get(prefix + "v")
        if saved_v is not None and saved_v.shape != self.v.shape:
            if saved_v.numel() == 0:
                self.input_size = None
                self.u = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)
                self.v = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)
            else:
                output_size = self._set_size(tuple(saved_v.shape[-2:]))
                self.v = torch.empty(1, self.in_channels, *self.input_size, dtype=self.weight.dtype,
                                     device=self.weight.device)
                self.u = torch.empty(1, self.out_channels, *output_size, dtype=self.weight.dtype,
                                     device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _operator(self, weight: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, weight, stride=self.stride, padding=self.padding)

    def _adjoint(self, weight: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(u, weight, stride=self.stride, padding=self.padding,
                                  output_padding=self._output_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SpectralNormConv2d expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if self.input_size is None:
            self._create_state(size)
        elif size != self.input_size:
            raise ValueError(
                f"SpectralNormConv2d was set up for inputs of spatial size {self.input_size} (its "
                f"spectral norm is that of the operator at this size) but got {size}; build a new "
                "layer for another input size"
            )
        return F.conv2d(x, self.normalized_weight(), self.bias, stride=self.stride, padding=self.padding)

    def lipschitz_bound(self) -> float:
        """Upper bound of the normalised convolution's operator norm at the input size: the smaller of
        the FFT bound and, for small layers, the norm of its dense matrix (:func:`conv_operator_norm_exact`)."""
        self._require_state()
        with torch.no_grad():
            weight = self.normalized_weight()
            bound = conv_operator_norm_bound(weight, self.input_size, self.padding)
            exact = conv_operator_norm_exact(weight, self.input_size, self.padding, self.stride)
            return bound if exact is None else min(bound, exact)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, coeff={self.coeff}, "
                f"input_size={self.input_size}")

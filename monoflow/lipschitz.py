r"""Lipschitz-constrained networks: spectral normalisation and the Lipschitz DenseNet (i-DenseNet).

Spectral normalisation. A layer with weight :math:`W` uses

.. math::  \bar W = W / \max(1, \sigma / c),

where :math:`c` is ``coeff`` and :math:`\sigma = u^\top W v` comes from persistent power-iteration
vectors :math:`u, v` (constants for autograd). The forward pass never runs the power iteration;
:func:`update_lipschitz` does (after each optimiser step and before evaluation). For a
convolution, :math:`\sigma` is the norm of the convolution *operator* at the layer's input size.

Lipschitz dense layer. :math:`x \mapsto [\eta_1 x,\ \eta_2\, a(\bar W x + b)]` (concatenation along
dim 1) with :math:`\eta_i = \mathrm{softplus}(K_i) + 0.1`, rescaled so that
:math:`\|(\eta_1, \eta_2)\|_2 = ` ``lip_coeff``. Its Lipschitz constant is at most
:math:`\sqrt{\eta_1^2 + \eta_2^2 (\mathrm{Lip}(a)\,\|\bar W\|)^2}`, and the network
:math:`g` (``depth`` dense layers, then a normalised layer back to the input width) is bounded
by the product over its layers. :func:`certify_lipschitz` computes that product from the exact
singular values (linear layers) or an FFT bound (convolutions), independently of the power
iteration.

Why not ``torch.nn.utils.parametrizations.spectral_norm``: it always divides by :math:`\sigma`
(no ``max(1, \sigma/c)``, so no coefficient below 1), runs its power iteration inside every
training forward (the fixed-point solves evaluate g many times per step, and the weights must
not change between those evaluations), and normalises a convolution's reshaped kernel matrix,
whose norm is not the convolution operator's and does not bound its Lipschitz constant. Nor does
it give a rigorous bound to certify the result.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from monoflow.activations import make_activation

__all__ = [
    "SpectralNormLayer",
    "SpectralNormLinear",
    "SpectralNormConv2d",
    "conv_operator_norm_bound",
    "conv_operator_norm_exact",
    "LipschitzDenseLayer",
    "DenseNet",
    "LipschitzChain",
    "dense_mlp",
    "dense_convnet",
    "set_learnable_concat",
    "update_lipschitz",
    "LipschitzCertificate",
    "certify_lipschitz",
    "lipschitz_upper_bound",
    "certificates_record",
    "reuse_parameter_transforms",
    "dense_layer_output",
]

ActivationSpec = Union[str, Callable[[], nn.Module]]

_DEFAULT_TOL = 1e-3


def _normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm().clamp(min=eps)


def _check_positive_int(value: int, name: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} int, got {value!r}")
    return value


def _check_coeff(value: float, name: str) -> float:
    # Lip(g) < 1 is what makes the blocks invertible; a bound of 1 or more guarantees nothing
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1), got {value!r}")
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1 (the blocks need Lip(g) < 1), got {value}")
    return value


def _pair(value: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    else:
        pair = tuple(value)  # type: ignore[assignment]
        if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    return pair  # type: ignore[return-value]


_PASS = threading.local()


@contextlib.contextmanager
def reuse_parameter_transforms():
    r"""Within this context every normalised weight :math:`W/\max(1, \sigma/c)` and every pair of
    dense-layer scales is computed once with autograd and then reused.

    A flow pass evaluates each g several times with the same parameters (the graph evaluation at
    a fixed point and the Jacobian pass of the log-det); :class:`monoflow.flows.Flow` opens this
    context around its passes. Parameters and power-iteration vectors must not change inside it.
    Nested contexts share the outermost cache."""
    outermost = getattr(_PASS, "cache", None) is None
    if outermost:
        _PASS.cache = {}
    try:
        yield
    finally:
        if outermost:
            _PASS.cache = None


def _reused(owner: object, name: str, compute: Callable[[], object]):
    """``compute()``, or its value from earlier in the same :func:`reuse_parameter_transforms`."""
    if torch.compiler.is_compiling():
        # a compiled graph shares values itself; and reading _PASS here would make the graph
        # depend on it (a guard), so the first eager pass after compiling would compile again
        return compute()
    cache = getattr(_PASS, "cache", None)
    if cache is None:
        return compute()
    key = (id(owner), name)
    if key not in cache:
        cache[key] = (owner, compute())  # holding owner keeps id(owner) unique while cached
    return cache[key][1]


def _version_key(*tensors: torch.Tensor) -> Tuple[Tuple[int, int, int], ...]:
    """Identifies the current contents of tensors: in-place updates bump ``_version``."""
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


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
            return _reused(self, "normalized_weight", self._differentiable_normalized_weight)
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


def conv_operator_norm_bound(
    weight: torch.Tensor, input_size: Tuple[int, int], padding: Tuple[int, int]
) -> float:
    r"""Upper bound of the operator norm of ``conv2d(x, weight, padding=padding)`` on inputs of
    spatial size ``input_size`` (any stride: striding only drops outputs).

    The zero-padded convolution is the zero-padding embedding (an isometry) followed by a
    circular convolution on the :math:`(H + 2p_h) \times (W + 2p_w)` grid and a restriction to
    the valid outputs. The circular convolution is block-diagonalised by the 2-D DFT, so its norm
    is :math:`\max_\omega \|\hat K(\omega)\|_2` over the :math:`C_{out} \times C_{in}` blocks
    :math:`\hat K(\omega) = \sum_{a,b} K_{:,:,a,b}\, e^{-2\pi i (a\omega_1/N_1 + b\omega_2/N_2)}`.
    """
    height, width = input_size
    n1, n2 = height + 2 * padding[0], width + 2 * padding[1]
    kh, kw = weight.shape[-2:]
    if n1 < kh or n2 < kw:
        raise ValueError(
            f"kernel {kh}x{kw} is larger than the padded input {n1}x{n2}: no valid output"
        )
    with torch.no_grad():
        weight = weight.detach().double()
        if kh == 1 and kw == 1:  # the spectrum is the same matrix at every frequency
            return float(torch.linalg.matrix_norm(weight[:, :, 0, 0], 2))
        # a real kernel has a conjugate-symmetric spectrum: half the frequencies suffice
        spectrum = torch.fft.rfft2(weight, s=(n1, n2))  # (Cout, Cin, n1, n2 // 2 + 1)
        blocks = spectrum.permute(2, 3, 0, 1).reshape(-1, weight.shape[0], weight.shape[1])
        if blocks.shape[1] > blocks.shape[2]:
            blocks = blocks.transpose(1, 2)
        # largest singular value = sqrt of the largest eigenvalue of the smaller Gram matrix
        chunk = max(1, int(2**22 // (blocks.shape[1] * blocks.shape[2])))
        best = 0.0
        for start in range(0, blocks.shape[0], chunk):
            part = blocks[start:start + chunk]
            gram = part @ part.conj().transpose(1, 2)
            best = max(best, float(torch.linalg.eigvalsh(gram)[:, -1].max().clamp(min=0)))
        best = math.sqrt(best)
    return best


#: the most entries (inputs x outputs) of a convolution's dense matrix that
#: :func:`conv_operator_norm_exact` builds (64 MiB in float64)
DENSE_CONV_NORM_LIMIT = 2**23


def conv_operator_norm_exact(weight: torch.Tensor, input_size: Tuple[int, int], padding: Tuple[int, int],
                             stride: int = 1, limit: int = DENSE_CONV_NORM_LIMIT) -> Optional[float]:
    r"""The operator norm of ``conv2d(x, weight, stride, padding)`` on inputs of spatial size
    ``input_size``, from its dense matrix in float64 (columns: the convolution of each basis
    image), with a relative margin of :math:`10^{-9}` for rounding; ``None`` when the matrix
    would have more than ``limit`` entries.

    On small images the FFT bound of :func:`conv_operator_norm_bound` can exceed the norm by
    10% or more (the circular embedding adds wrap-around paths that zero padding does not have);
    this is the norm itself, so certificates of small models do not fail for want of tightness.
    """
    c_in, (height, width) = weight.shape[1], input_size
    kh, kw = weight.shape[-2:]
    out_h = (height + 2 * padding[0] - kh) // stride + 1
    out_w = (width + 2 * padding[1] - kw) // stride + 1
    n_in, n_out = c_in * height * width, weight.shape[0] * out_h * out_w
    if n_in * n_out > limit or out_h < 1 or out_w < 1:
        return None
    with torch.no_grad():
        weight = weight.detach().double()
        columns = []
        for start in range(0, n_in, 1024):  # basis images in chunks, so no n_in x n_in identity
            count = min(1024, n_in - start)
            basis = torch.zeros(count, n_in, dtype=torch.float64, device=weight.device)
            basis[torch.arange(count), torch.arange(start, start + count)] = 1.0
            out = F.conv2d(basis.view(count, c_in, height, width), weight, stride=stride, padding=padding)
            columns.append(out.reshape(count, n_out))
        matrix = torch.cat(columns)  # (n_in, n_out): the transpose of the operator
        gram = matrix.T @ matrix if n_out <= n_in else matrix @ matrix.T
        largest = float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0))
    return math.sqrt(largest) * (1 + 1e-9)


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
        return _reused(self, "etas", self._learned_etas)

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


class LipschitzChain(nn.Sequential):
    r"""Spectral-normalised linear layers and elementwise activations applied in order (Residual
    Flow's g, :func:`monoflow.models.toy.lipswish_mlp`), :math:`\mathrm{Lip} \le \prod_\ell
    \mathrm{Lip}(\ell)`, with forward propagation of the Jacobian for flat inputs (:meth:`jacobian`)."""

    def jacobian(self, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""``(g(w), J)`` for ``w`` of shape (B, d), ``J[b] = dg/dw`` at ``w[b]`` (B, d_out, d):
        :math:`J \leftarrow \bar W J` through a linear layer, :math:`J \leftarrow a'(h) \odot J`
        through an activation (ordinary differentiable ops, so it can be trained through)."""
        if w.dim() != 2:
            raise ValueError(f"LipschitzChain.jacobian expects flat inputs (B, d), got shape {tuple(w.shape)}")
        return _propagate_jacobian(self, w)


def _propagate_jacobian(layers: Sequence[nn.Module], w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(g(w), dg/dw)`` through ``layers`` for flat ``w`` (B, d): each layer steps with its
    ``forward_with_jacobian``, or as an elementwise activation with its ``derivative``."""
    batch, dim = w.shape
    # propagated transposed, (B, d, channels), so each linear map is one batched GEMM
    jac = torch.eye(dim, dtype=w.dtype, device=w.device).expand(batch, dim, dim)
    x = w
    for layer in layers:
        if hasattr(layer, "forward_with_jacobian"):
            x, jac = layer.forward_with_jacobian(x, jac)
        elif hasattr(layer, "derivative") and not getattr(layer, "concatenates", False):
            x, jac = layer(x), layer.derivative(x).unsqueeze(1) * jac
        else:
            raise ValueError(f"LipschitzChain.jacobian needs linear layers with forward_with_jacobian and "
                             f"elementwise activations with derivative; got a {type(layer).__name__}")
    return x, jac.transpose(1, 2)


class DenseNet(nn.Module):
    r"""The Lipschitz DenseNet :math:`g`: dense layers followed by a normalised layer back to the
    input width; :math:`\mathrm{Lip}(g) \le \prod_\ell \mathrm{Lip}(\ell)`.

    Build it with :func:`dense_mlp` (flat inputs) or :func:`dense_convnet` (images).
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(layers) == 0:
            raise ValueError("DenseNet needs at least one layer")
        self.layers = nn.ModuleList(layers)
        *dense, last = self.layers
        # exact types: subclasses may change what a layer computes
        self._flat = type(last) is SpectralNormLinear and all(
            type(layer) is LipschitzDenseLayer and type(layer.linear) is SpectralNormLinear for layer in dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._flat and x.dim() == 2 and not torch.is_grad_enabled():
            return self._forward_into_buffer(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def _forward_into_buffer(self, x: torch.Tensor) -> torch.Tensor:
        r"""The same map without autograd (fixed-point solves), without copying features: the
        input of layer :math:`\ell` is :math:`\mathrm{diag}(s_\ell)\, u` for the unscaled features
        :math:`u = [x, a_1, a_2, \dots]`, written once into one buffer, and the column scales
        :math:`s_\ell` (products of the :math:`\eta`'s) are folded into the weights,
        :math:`\bar W_\ell\, \mathrm{diag}(s_\ell)`, cached until a parameter changes."""
        *dense, last = self.layers
        weights = self._column_scaled_weights(x.shape[1])
        features = x.new_empty(x.shape[0], last.in_features)
        width = x.shape[1]
        features[:, :width] = x
        for layer, weight in zip(dense, weights):
            value = layer.activation(F.linear(features[:, :width], weight, layer.linear.bias))
            features[:, width:width + value.shape[1]] = value
            width += value.shape[1]
        return F.linear(features, weights[-1], last.bias)

    def _column_scaled_weights(self, width: int) -> List[torch.Tensor]:
        r""":meth:`_scaled_weights` without autograd, cached until a parameter changes."""
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
        # the eta's folded into the next layers' weights (see _scaled_weights): no rescaling of
        # batch-sized features and Jacobians, and cheap gradients for learnable concatenation
        eager_no_grad = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        weights = (self._column_scaled_weights if eager_no_grad else self._scaled_weights)(w.shape[1])
        *dense, last = self.layers
        batch, dim = w.shape
        jac = torch.eye(dim, dtype=w.dtype, device=w.device).expand(batch, dim, dim)  # transposed, (B, d, channels)
        x = w
        for layer, weight in zip(dense, weights):
            pre, pre_jac = F.linear(x, weight, layer.linear.bias), F.linear(jac, weight)
            x, jac = dense_layer_output(layer.activation, x, pre, 1.0, 1.0, jac, pre_jac)
        return F.linear(x, weights[-1], last.bias), F.linear(jac, weights[-1]).transpose(1, 2)

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


def update_lipschitz(
    model: nn.Module,
    n_iterations: Optional[int] = None,
    tol: Optional[float] = None,
    max_iterations: int = 200,
) -> int:
    """Run :meth:`SpectralNormLayer.power_iteration` on every spectral-normalised layer of
    ``model`` (toy training: ``n_iterations=5``; images and evaluation: ``tol=1e-3``, at most
    ``max_iterations``). Convolutions that have not seen an input yet are skipped. Returns the
    largest number of iterations any layer ran."""
    layers = [m for m in model.modules() if isinstance(m, SpectralNormLayer) and m.has_power_iteration_state()]
    if n_iterations is not None and tol is None:
        # a fixed number of iterations: linear layers of the same shape run as one batch
        _check_positive_int(n_iterations, "n_iterations", allow_zero=True)
        groups: dict = {}
        for layer in layers:
            if type(layer) is SpectralNormLinear:
                groups.setdefault((tuple(layer.weight.shape), layer.weight.dtype, layer.weight.device), []).append(layer)
        for group in groups.values():
            _batched_power_iteration(group, n_iterations)
        batched = {id(layer) for group in groups.values() for layer in group}
        layers = [layer for layer in layers if id(layer) not in batched]
        if batched and not layers:
            return n_iterations
    most = 0
    for layer in layers:
        most = max(most, layer.power_iteration(n_iterations, tol, max_iterations))
    return most


@torch.no_grad()
def _batched_power_iteration(layers: Sequence["SpectralNormLinear"], n_iterations: int) -> None:
    """``n_iterations`` power iterations on each layer's weight, all layers (same weight shape) at
    once with batched matrix products; the same updates as ``layer.power_iteration(n)``."""
    weights = torch.stack([layer.weight.detach() for layer in layers])  # (L, out, in)
    u = torch.stack([layer.u for layer in layers]).unsqueeze(-1)  # (L, out, 1)
    v = torch.stack([layer.v for layer in layers]).unsqueeze(-1)
    for _ in range(n_iterations):
        v = torch.bmm(weights.transpose(1, 2), u)
        v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)
        u = torch.bmm(weights, v)
        u = u / u.norm(dim=1, keepdim=True).clamp(min=1e-12)
    torch._foreach_copy_([layer.u for layer in layers], list(u.squeeze(-1).unbind(0)))
    torch._foreach_copy_([layer.v for layer in layers], list(v.squeeze(-1).unbind(0)))


@dataclass(frozen=True)
class LipschitzCertificate:
    """Certified Lipschitz bound of one network ``g`` (``name`` as in ``model.named_modules``).

    ``bound`` is rigorous (exact / FFT norms), ``estimate_from_power_iteration`` what the
    power-iteration vectors say, ``holds`` whether ``bound < 1`` (the blocks need Lip(g) < 1).
    """

    name: str
    bound: float
    estimate_from_power_iteration: float
    holds: bool


def _chain_bounds(chain: nn.Sequential) -> Optional[Tuple[float, float]]:
    """(rigorous, power-iteration) bounds of a Sequential of spectral-norm layers and activations
    with a known Lipschitz constant; ``None`` if some layer cannot be bounded."""
    bound, estimate = 1.0, 1.0
    for layer in chain:
        if isinstance(layer, SpectralNormLayer):
            bound *= layer.lipschitz_bound()
            estimate *= layer.lipschitz_estimate()
        elif hasattr(layer, "lipschitz_constant"):
            bound *= float(layer.lipschitz_constant)
            estimate *= float(layer.lipschitz_constant)
        else:
            return None
    return bound, estimate


def certify_lipschitz(model: nn.Module) -> List[LipschitzCertificate]:
    """An independent upper bound of Lip(g) for every :class:`DenseNet` in ``model`` and every
    ``nn.Sequential`` chain of spectral-norm layers and activations (Residual Flow's g)."""
    certificates = []
    for name, module in model.named_modules():
        if isinstance(module, DenseNet):
            bound, estimate = module.lipschitz_bound(), module.lipschitz_estimate()
        elif isinstance(module, nn.Sequential) and any(isinstance(m, SpectralNormLayer) for m in module):
            bounds = _chain_bounds(module)
            if bounds is None:
                continue
            bound, estimate = bounds
        else:
            continue
        certificates.append(LipschitzCertificate(
            name=name or "g", bound=bound, estimate_from_power_iteration=estimate, holds=bound < 1.0,
        ))
    return certificates


def lipschitz_upper_bound(module: nn.Module) -> Optional[float]:
    r"""A rigorous upper bound of :math:`\mathrm{Lip}(\text{module})` read from its structure, or
    ``None`` where the structure gives none.

    Known: a module's own ``lipschitz_bound()`` (spectral-norm layers, dense layers,
    :class:`DenseNet`, ensembles of them), a ``lipschitz_constant`` attribute (the activations,
    or a parameter-free map that declares its constant), ``nn.Identity`` (1), and an
    ``nn.Sequential`` of known modules (the product of their bounds).

    Raises:
        RuntimeError: the bound exists but cannot be computed yet (a convolution whose input
            size is not known before its first forward pass).

    Example:
        >>> lipschitz_upper_bound(nn.Sequential(SpectralNormLinear(2, 2, coeff=0.5), nn.Identity())) < 1
        True
        >>> lipschitz_upper_bound(nn.Tanh()) is None
        True
    """
    bound_fn = getattr(module, "lipschitz_bound", None)
    if callable(bound_fn):
        return float(bound_fn())
    constant = getattr(module, "lipschitz_constant", None)
    if constant is not None:
        return float(constant)
    if isinstance(module, nn.Identity):
        return 1.0
    if isinstance(module, nn.Sequential):
        bound = 1.0
        for layer in module:
            layer_bound = lipschitz_upper_bound(layer)
            if layer_bound is None:
                return None
            bound *= layer_bound
        return bound
    return None


def certificates_record(model: nn.Module) -> dict:
    """The certificates of :func:`certify_lipschitz` as plain data for a run record:
    ``bound_max``, ``all_below_one`` and one entry per network g (``name``, ``bound``,
    ``estimate_from_power_iteration``, ``holds``)."""
    from dataclasses import asdict

    certificates = certify_lipschitz(model)
    return {
        "bound_max": max((c.bound for c in certificates), default=None),
        "all_below_one": all(c.holds for c in certificates),
        "networks": [asdict(c) for c in certificates],
        "definition": "rigorous upper bound of Lip(g) of each block's network g (exact singular values of the "
                      "linear layers, FFT bounds of convolutions, known activation constants), independent of the "
                      "power iteration",
    }

r"""Log-determinant estimators, written once and shared by every block.

Each block needs :math:`\log|\det M(J)|` for a matrix function of the Jacobian :math:`J` of its
network g at a point w. Every such function used here has a power series in :math:`J`

.. math:: \log|\det M(J)| = \sum_{k\ge 1} c_k\,\mathrm{tr}(J^k),

described by a :class:`LogDetSeries`: the coefficients :math:`c_k` and the exact matrix formula.

* residual block, :math:`\log\det(I+J)`: :math:`c_k = (-1)^{k+1}/k`;
* monotone block, :math:`\log\det(I-J) - \log\det(I+J)`: :math:`c_k = -2/k` for odd k, 0 for even
  (only odd powers appear);
* inverses negate the coefficients.

Estimators (all take ``(g, w, series, training)`` and return the log-det of shape (batch,)):

* :class:`ExactLogDet`: the full Jacobian and ``slogdet`` (small dimensions);
* :class:`PowerSeriesLogDet`: the truncated series with Hutchinson probes (biased);
* :class:`RussianRouletteLogDet`: the unbiased Russian-roulette series (Chen et al., 2019), with
  the Neumann-series gradient and the memory-efficient mode as options.

The Neumann gradient uses :math:`\mathrm{d}\sum_k c_k \mathrm{tr}(J^k) = \sum_{j\ge0} b_j
\mathrm{tr}(J^j\,\mathrm{d}J)` with :math:`b_j = (j+1)\,c_{j+1}`; for the monotone block this is
:math:`-2\,\mathrm{tr}((I-J^2)^{-1}\mathrm{d}J)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = [
    "LogDetSeries",
    "RESIDUAL",
    "CAYLEY",
    "LogDetEstimator",
    "ExactLogDet",
    "PowerSeriesLogDet",
    "RussianRouletteLogDet",
    "make_estimator",
    "jacobian",
    "ESTIMATOR_NAMES",
]


def _slogabsdet(matrix: Tensor) -> Tensor:
    d = matrix.shape[-1]
    if d == 1:
        return matrix[..., 0, 0].abs().log()
    if d == 2:
        det = matrix[..., 0, 0] * matrix[..., 1, 1] - matrix[..., 0, 1] * matrix[..., 1, 0]
        return det.abs().log()
    return torch.linalg.slogdet(matrix)[1]


@dataclass(frozen=True)
class LogDetSeries:
    r""":math:`\log|\det M(J)| = \text{sign}\sum_k c_k \mathrm{tr}(J^k)`, and its exact formula."""

    name: str
    coefficient_fn: Callable[[int], float]
    exact_fn: Callable[[Tensor], Tensor]
    sign: float = 1.0

    def coefficient(self, k: int) -> float:
        """:math:`c_k` (times the sign), k >= 1."""
        return self.sign * self.coefficient_fn(k)

    def neumann_coefficient(self, j: int) -> float:
        r""":math:`b_j = (j+1) c_{j+1}`: weight of :math:`\mathrm{tr}(J^j\,\mathrm{d}J)` in the gradient."""
        return (j + 1) * self.coefficient(j + 1)

    def exact(self, J: Tensor) -> Tensor:
        """Exact value from the batch of Jacobians J, shape (batch, d, d)."""
        return self.sign * self.exact_fn(J)

    def negated(self) -> "LogDetSeries":
        """The series of the inverse map: all coefficients negated."""
        return LogDetSeries(f"-({self.name})", self.coefficient_fn, self.exact_fn, -self.sign)


def _identity_like(J: Tensor) -> Tensor:
    return torch.eye(J.shape[-1], dtype=J.dtype, device=J.device).expand_as(J)


RESIDUAL = LogDetSeries(
    "log det(I + J)",
    lambda k: (-1.0) ** (k + 1) / k,
    lambda J: _slogabsdet(_identity_like(J) + J),
)
CAYLEY = LogDetSeries(
    "log det(I - J) - log det(I + J)",
    lambda k: -2.0 / k if k % 2 == 1 else 0.0,
    lambda J: _slogabsdet(_identity_like(J) - J) - _slogabsdet(_identity_like(J) + J),
)


def jacobian(g: nn.Module, w: Tensor, create_graph: bool) -> Tensor:
    """Per-sample Jacobian dg/dw of shape (batch, d, d) for flat inputs (batch, d).

    Uses ``g.jacobian(w)`` (forward Jacobian propagation) when g provides it, autograd otherwise.
    The fallback takes one backward pass per output row rather than ``torch.func.jacrev`` with
    ``vmap``: g may hold custom autograd Functions (Pila's value and derivative) that define no
    vmap rule, and the fallback only serves small d (exact log-dets of the toys and the tests).
    """
    if hasattr(g, "jacobian"):
        return g.jacobian(w)[1]
    with torch.enable_grad():
        w_ = w if w.requires_grad else w.detach().requires_grad_(True)
        out = g(w_)
        rows = []
        for i in range(out.shape[1]):
            (row,) = torch.autograd.grad(out[:, i].sum(), w_, create_graph=create_graph, retain_graph=True)
            rows.append(row)
    return torch.stack(rows, dim=1)


class LogDetEstimator:
    """Base class: ``estimator(g, w, series, training, cache=None) -> log-det of shape (batch,)``.

    ``cache`` (a dict shared with the solve at the same point) may receive the detached Jacobian
    under ``"jacobian"`` so that a direct adjoint solve can reuse it."""

    #: whether the estimator needs only a (batch, d) input with small d
    flat_only: bool = False

    def __call__(self, g: nn.Module, w: Tensor, series: LogDetSeries, training: bool,
                 cache: Optional[dict] = None) -> Tensor:
        raise NotImplementedError

    def value_and_logdet(self, g: nn.Module, w: Tensor, series: LogDetSeries, training: bool,
                         cache: Optional[dict] = None) -> Tuple[Tensor, Tensor]:
        """``(g(w), log-det at w)``: for blocks that need both at the same point (residual
        blocks). Estimators that evaluate g(w) on the way return that evaluation."""
        return g(w), self(g, w, series, training, cache)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class ExactLogDet(LogDetEstimator):
    """Exact log-det from the full Jacobian (inputs (batch, d) with d <= ``max_dim``)."""

    flat_only = True

    def __init__(self, max_dim: int = 64):
        self.max_dim = max_dim

    def __call__(self, g: nn.Module, w: Tensor, series: LogDetSeries, training: bool,
                 cache: Optional[dict] = None) -> Tensor:
        self._check(w)
        J = jacobian(g, w, create_graph=torch.is_grad_enabled())
        if cache is not None:
            cache["jacobian"] = J.detach()
        return series.exact(J)

    def value_and_logdet(self, g: nn.Module, w: Tensor, series: LogDetSeries, training: bool,
                         cache: Optional[dict] = None) -> Tuple[Tensor, Tensor]:
        """One Jacobian pass gives g(w) too, when g propagates Jacobians (``g.jacobian``)."""
        if not hasattr(g, "jacobian"):
            return super().value_and_logdet(g, w, series, training, cache)
        self._check(w)
        value, J = g.jacobian(w)
        if cache is not None:
            cache["jacobian"] = J.detach()
        return value, series.exact(J)

    def _check(self, w: Tensor) -> None:
        if w.dim() != 2:
            raise ValueError(
                f"logdet='exact' needs inputs of shape (batch, d), got {tuple(w.shape)}; "
                "use a stochastic estimator (logdet='russian_roulette') for images"
            )
        if w.shape[1] > self.max_dim:
            raise ValueError(
                f"logdet='exact' builds the full {w.shape[1]}x{w.shape[1]} Jacobian; allowed up to "
                f"d={self.max_dim} (pass ExactLogDet(max_dim=...) to raise the limit)"
            )


def _probe(w: Tensor, kind: str, generator: Optional[torch.Generator]) -> Tensor:
    if kind == "gaussian":
        return torch.randn(w.shape, dtype=w.dtype, device=w.device, generator=generator)
    if kind == "rademacher":
        return torch.randint(0, 2, w.shape, device=w.device, generator=generator).to(w.dtype) * 2 - 1
    raise ValueError(f"unknown probe {kind!r}; expected 'gaussian' or 'rademacher'")


def _sample_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(dim=1)


class _AttachGradient(torch.autograd.Function):
    """Returns ``value``; its backward hands out gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, value: Tensor, w: Tensor, grad_w: Tensor, *params_and_grads: Tensor) -> Tensor:
        n = len(params_and_grads) // 2
        ctx.save_for_backward(grad_w, *params_and_grads[n:])
        ctx.n = n
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_value: Tensor):
        grad_w, *param_grads = ctx.saved_tensors
        if grad_value.numel() > 1 and not torch.allclose(grad_value, grad_value.flatten()[0].expand_as(grad_value)):
            raise RuntimeError(
                "memory_efficient log-det gradients assume the loss weights every sample's log-det "
                "equally (a mean or sum of log-likelihoods); use memory_efficient=False otherwise"
            )
        weight = grad_value.flatten()[0]
        shape = (-1,) + (1,) * (grad_w.dim() - 1)
        grads_params = tuple(None if gp is None else weight * gp for gp in param_grads)
        return (None, grad_value.reshape(shape) * grad_w, None) + grads_params + (None,) * ctx.n


class _SeriesEstimator(LogDetEstimator):
    """Shared machinery of the stochastic series estimators: probe chains of vector-Jacobian products."""

    def __init__(self, n_probes: int, probe: str, gradient: str, memory_efficient: bool):
        if n_probes < 1:
            raise ValueError(f"n_probes must be >= 1, got {n_probes}")
        if probe not in ("gaussian", "rademacher"):
            raise ValueError(f"unknown probe {probe!r}; expected 'gaussian' or 'rademacher'")
        if gradient not in ("backprop", "neumann"):
            raise ValueError(f"unknown gradient mode {gradient!r}; expected 'backprop' or 'neumann'")
        self.n_probes = n_probes
        self.probe = probe
        self.gradient = gradient
        self.memory_efficient = memory_efficient
        self.generator: Optional[torch.Generator] = None

    def draw_terms(self, training: bool) -> Tuple[int, Sequence[float]]:
        """Number of terms n and the weight of each term k = 1..n (1 for plain truncation)."""
        raise NotImplementedError

    def _one_probe(self, g_w: Tensor, w: Tensor, series: LogDetSeries, n: int, weights: Sequence[float],
                   differentiable: bool) -> Tensor:
        v = _probe(w, self.probe, self.generator)
        if self.gradient == "backprop":
            u, total = v, 0.0
            for k in range(1, n + 1):
                (u,) = torch.autograd.grad(g_w, w, u, create_graph=differentiable, retain_graph=True)
                c = series.coefficient(k) * weights[k - 1]
                if c != 0.0:
                    total = total + c * _sample_dot(u, v)
            return total if torch.is_tensor(total) else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        # Neumann gradient: value from the detached chain, gradient from a^T J v with a detached.
        u = v
        value = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        a = torch.zeros_like(v)
        for k in range(1, n + 1):
            a = a + series.neumann_coefficient(k - 1) * weights[k - 1] * u  # u = v^T J^(k-1)
            (u,) = torch.autograd.grad(g_w, w, u, retain_graph=True)
            value = value + series.coefficient(k) * weights[k - 1] * _sample_dot(u, v)
        if not differentiable:
            return value
        (a_J,) = torch.autograd.grad(g_w, w, a.detach(), create_graph=True, retain_graph=True)
        surrogate = _sample_dot(a_J, v)
        return value.detach() + surrogate - surrogate.detach()

    def __call__(self, g: nn.Module, w: Tensor, series: LogDetSeries, training: bool,
                 cache: Optional[dict] = None) -> Tensor:
        n, weights = self.draw_terms(training)
        differentiable = torch.is_grad_enabled() and (w.requires_grad or any(p.requires_grad for p in g.parameters()))
        detach_point = self.memory_efficient or not w.requires_grad
        with torch.enable_grad():
            w_ = w.detach().requires_grad_(True) if detach_point else w
            g_w = g(w_)
            estimate = sum(
                self._one_probe(g_w, w_, series, n, weights, differentiable) for _ in range(self.n_probes)
            ) / self.n_probes
            if not (differentiable and self.memory_efficient and estimate.requires_grad):
                return estimate if differentiable else estimate.detach()
            params = [p for p in g.parameters() if p.requires_grad]
            # retain_graph: parts of the graph (normalised weights) may be shared with the rest of the
            # pass (reuse_parameter_transforms); this graph is freed when the function returns
            grads = torch.autograd.grad(estimate.sum(), [w_] + params, allow_unused=True, retain_graph=True)
        grad_w, param_grads = grads[0], list(grads[1:])
        param_grads = [torch.zeros_like(p) if gp is None else gp for p, gp in zip(params, param_grads)]
        return _AttachGradient.apply(estimate.detach(), w, grad_w, *params, *param_grads)


class PowerSeriesLogDet(_SeriesEstimator):
    r"""Truncated series :math:`\sum_{k=1}^{n} c_k\, v^\top J^k v` with Hutchinson probes v (biased)."""

    def __init__(self, n_terms: int = 10, n_probes: int = 1, probe: str = "gaussian",
                 gradient: str = "backprop", memory_efficient: bool = False):
        super().__init__(n_probes, probe, gradient, memory_efficient)
        if n_terms < 1:
            raise ValueError(f"n_terms must be >= 1, got {n_terms}")
        self.n_terms = n_terms

    def draw_terms(self, training: bool) -> Tuple[int, Sequence[float]]:
        return self.n_terms, [1.0] * self.n_terms


class RussianRouletteLogDet(_SeriesEstimator):
    r"""Unbiased Russian-roulette series (Chen et al., 2019).

    Draws N from ``distribution`` (geometric(p) on {0, 1, ...} or Poisson(lam)), evaluates
    ``n_exact_terms + N`` terms and reweights term :math:`k > n_{exact}` by
    :math:`1/P(N \ge k - n_{exact})`, so the expectation is the full series. In evaluation mode
    ``eval_n_exact_terms`` exact terms are used (lower variance, still unbiased).
    """

    def __init__(self, distribution: str = "geometric", p: float = 0.5, lam: float = 2.0,
                 n_exact_terms: int = 2, eval_n_exact_terms: Optional[int] = None, n_probes: int = 1,
                 probe: str = "gaussian", gradient: str = "backprop", memory_efficient: bool = False):
        super().__init__(n_probes, probe, gradient, memory_efficient)
        if distribution not in ("geometric", "poisson"):
            raise ValueError(f"unknown roulette distribution {distribution!r}; expected 'geometric' or 'poisson'")
        if not 0.0 < p < 1.0:
            raise ValueError(f"geometric p must be in (0, 1), got {p}")
        if lam <= 0:
            raise ValueError(f"poisson lam must be positive, got {lam}")
        if n_exact_terms < 0:
            raise ValueError(f"n_exact_terms must be >= 0, got {n_exact_terms}")
        self.distribution = distribution
        self.p = p
        self.lam = lam
        self.n_exact_terms = n_exact_terms
        self.eval_n_exact_terms = n_exact_terms if eval_n_exact_terms is None else eval_n_exact_terms

    def tail_probability(self, j: int) -> float:
        """:math:`P(N \\ge j)`."""
        if j <= 0:
            return 1.0
        if self.distribution == "geometric":
            return (1.0 - self.p) ** j
        cdf = sum(math.exp(-self.lam) * self.lam**i / math.factorial(i) for i in range(j))
        return max(1.0 - cdf, 1e-300)

    def sample_n(self) -> int:
        """Draw N (from the estimator's generator if set)."""
        if self.distribution == "geometric":
            u = float(torch.rand((), generator=self.generator))
            return int(math.floor(math.log1p(-u) / math.log1p(-self.p))) if u > 0 else 0
        return int(torch.poisson(torch.tensor(float(self.lam)), generator=self.generator))

    def draw_terms(self, training: bool) -> Tuple[int, Sequence[float]]:
        n_exact = self.n_exact_terms if training else self.eval_n_exact_terms
        n = n_exact + self.sample_n()
        weights = [1.0 if k <= n_exact else 1.0 / self.tail_probability(k - n_exact) for k in range(1, n + 1)]
        return n, weights


ESTIMATOR_NAMES = ("exact", "power_series", "russian_roulette", "neumann")


def make_estimator(spec: Union[None, str, LogDetEstimator]) -> Optional[LogDetEstimator]:
    """An estimator from a name (``"exact"``, ``"power_series"``, ``"russian_roulette"``,
    ``"neumann"`` = roulette with Neumann gradient), an instance (returned as is) or ``None``."""
    if spec is None or isinstance(spec, LogDetEstimator):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"logdet must be a name, a LogDetEstimator or None, got {type(spec).__name__}")
    if spec == "exact":
        return ExactLogDet()
    if spec in ("power_series", "series"):
        return PowerSeriesLogDet()
    if spec in ("russian_roulette", "roulette"):
        return RussianRouletteLogDet()
    if spec == "neumann":
        return RussianRouletteLogDet(gradient="neumann")
    raise ValueError(f"unknown log-det estimator {spec!r}; expected one of {ESTIMATOR_NAMES} or None")

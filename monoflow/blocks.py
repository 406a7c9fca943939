r"""Invertible blocks with one interface.

Every block maps ``y, logdet = block(x)`` with ``logdet`` :math:`=\log|\det \partial y/\partial x|`
of shape (batch,), and ``x, logdet = block.inverse(y)`` with ``logdet``
:math:`=\log|\det \partial x/\partial y|`. Blocks built with ``logdet=None`` (regression) return
``None`` for it; ``with_logdet=False`` skips it for one call (sampling).

* :class:`MonotoneBlock` (the paper's block): :math:`F(x) = \sqrt2\,w - x` with
  :math:`w + g(w) = \sqrt2\,x`; inverse :math:`x = \sqrt2\,w - y` with :math:`w - g(w) = \sqrt2\,y`.
  The graph of F is the graph of g turned by 45 degrees: :math:`w = (x+y)/\sqrt2`,
  :math:`g(w) = (x-y)/\sqrt2`. :math:`\log|\det F'| = \log\det(I-J) - \log\det(I+J)` at w.
* :class:`ResidualBlock` (i-ResNet / Residual Flow / i-DenseNet): :math:`y = x + g(x)`.
* :class:`ImplicitBlock` (Lu et al., 2021): :math:`(\mathrm{Id}+g_2)^{-1}\circ(\mathrm{Id}+g_1)`.
* :class:`ActNorm`: :math:`y = (x + b)\,e^{s}` per channel, initialised from the first batch.

Solves and log-det estimators are shared (:mod:`monoflow.implicit`, :mod:`monoflow.logdet`); the
blocks differ only in the equation solved and the log-det series.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from monoflow.implicit import solve_resolvent
from monoflow.lipschitz import lipschitz_upper_bound
from monoflow.logdet import CAYLEY, RESIDUAL, ExactLogDet, LogDetEstimator, LogDetSeries, make_estimator
from monoflow.solvers import SolverInfo, SolverOptions

__all__ = [
    "FlowBlock",
    "MonotoneBlock",
    "ResidualBlock",
    "ImplicitBlock",
    "ActNorm",
    "solver_stats",
    "check_lipschitz_constrained",
]

SQRT2 = math.sqrt(2.0)
LogDetSpec = Union[None, str, LogDetEstimator]
_UNCONSTRAINED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Bilinear)


def check_lipschitz_constrained(g: nn.Module) -> None:
    """Certify Lip(g) < 1 at construction, or raise ``ValueError``.

    Refused: plain ``nn.Linear`` / ``nn.Conv*`` layers (no spectral normalisation), a certified
    bound (:func:`~monoflow.lipschitz.lipschitz_upper_bound`) of 1 or more, and a g whose
    structure gives no bound at all (a parameter-free map must declare its constant as a
    ``lipschitz_constant`` attribute). A convolution whose input size is not known yet is
    bounded by its structure (spectral-norm layers, activations of known constant).
    """
    if not isinstance(g, nn.Module):
        raise TypeError(f"g must be a torch.nn.Module, got {type(g).__name__}")
    for name, module in g.named_modules():
        if type(module) in _UNCONSTRAINED:
            raise ValueError(
                f"g contains an unconstrained {type(module).__name__} at {name or 'g'!r}: Lip(g) < 1 "
                "cannot hold; build g from monoflow.lipschitz (SpectralNormLinear, "
                "SpectralNormConv2d, dense_mlp, dense_convnet) or pass check_lipschitz=False if you "
                "guarantee Lip(g) < 1 yourself"
            )
    try:
        bound = lipschitz_upper_bound(g)
    except RuntimeError:  # e.g. a convolution whose input size is not known yet
        return
    if bound is None:
        raise ValueError(
            f"cannot bound the Lipschitz constant of g ({type(g).__name__}), and the block is invertible only if "
            "Lip(g) < 1: build g from monoflow.lipschitz (dense_mlp, dense_convnet, spectral-norm layers and "
            "activations in an nn.Sequential), give it a lipschitz_constant attribute or a lipschitz_bound() "
            "method returning a rigorous bound below 1, or pass check_lipschitz=False if you guarantee "
            "Lip(g) < 1 yourself"
        )
    if not bound < 1.0:
        raise ValueError(f"g has Lipschitz bound {bound:.4f} >= 1; the block would not be invertible")


def _check_input(x: Tensor, what: str) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{what} must have shape (batch, features...), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains non-finite values (nan or inf)")


def _expected_input(g: nn.Module) -> Optional[Tuple[int, int]]:
    """(number of dimensions, features) of the inputs g's first layer takes, where it says."""
    for module in g.modules():
        weight = getattr(module, "weight", None)
        features = getattr(module, "in_features", getattr(module, "in_channels", None))
        if isinstance(features, int) and isinstance(weight, Tensor):
            return weight.dim(), features  # (out, in) for a linear map, (out, in, kh, kw) for a convolution
    return None


def _check_like_weights(x: Tensor, what: str, module: nn.Module, g: Optional[nn.Module] = None) -> None:
    """``x`` has the dtype of ``module``'s weights and the layout g's first layer takes."""
    parameter = next(module.parameters(), None)
    if parameter is not None and x.dtype != parameter.dtype:
        raise TypeError(f"{what} has dtype {x.dtype} but the block's weights are {parameter.dtype}; convert one "
                        f"(x.to({parameter.dtype}) or block.to({x.dtype}))")
    if g is None:
        return
    expected = module.__dict__.get("_expected_input_cache", False)
    if expected is False:  # computed once: the architecture does not change
        expected = module.__dict__["_expected_input_cache"] = _expected_input(g)
    if expected is not None:
        ndim, features = expected
        if x.dim() != ndim or x.shape[1] != features:
            layout = ", ".join([str(features)] + ["..."] * (ndim - 2))
            raise ValueError(f"{what} must have shape (batch, {layout}) ({ndim} dimensions, {features} features "
                             f"or channels, as g's first layer takes), got {tuple(x.shape)}")


class FlowBlock(nn.Module):
    """Base class: ``y, logdet = block(x)`` and ``x, logdet = block.inverse(y)``."""

    def forward(self, x: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError

    def inverse(self, y: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError


class _ImplicitBase(FlowBlock):
    """Shared state of blocks that solve fixed points and estimate log-dets."""

    def __init__(self, logdet: LogDetSpec, solver: Optional[SolverOptions], adjoint: Optional[SolverOptions]):
        super().__init__()
        self.logdet_estimator = make_estimator(logdet)
        self.solver = solver
        self.adjoint = adjoint
        self.last_solves: Dict[str, SolverInfo] = {}

    def _record(self, name: str, info: SolverInfo) -> None:
        self.last_solves[name] = info

    def _solve(self, g: nn.Module, b: Tensor, sign: float, name: str, cache: Optional[dict] = None,
               exact_logdet_follows: bool = False) -> Tensor:
        """Solve ``z + sign g(z) = b``; ``exact_logdet_follows``: the exact log-det at the solution
        will put the Jacobian in ``cache`` (otherwise a direct adjoint takes it from the solve)."""
        return solve_resolvent(g, b, sign, self.solver, self.adjoint, record=self._record, name=name,
                               jacobian_cache=cache, jacobian_at_solution=not exact_logdet_follows)

    def _exact_logdet(self, with_logdet: bool) -> bool:
        return with_logdet and isinstance(self.logdet_estimator, ExactLogDet)

    def _logdet(self, g: nn.Module, w: Tensor, series: LogDetSeries, with_logdet: bool,
                cache: Optional[dict] = None) -> Optional[Tensor]:
        if self.logdet_estimator is None or not with_logdet:
            return None
        return self.logdet_estimator(g, w, series, self.training, cache)

    def _value_and_logdet(self, g: nn.Module, w: Tensor, series: LogDetSeries,
                          with_logdet: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """``(g(w), log-det at w)`` with one pass through g where the estimator allows it."""
        if self.logdet_estimator is None or not with_logdet:
            return g(w), None
        return self.logdet_estimator.value_and_logdet(g, w, series, self.training)

    def extra_repr(self) -> str:
        return f"logdet={self.logdet_estimator!r}"


class _SingleNetworkBlock(_ImplicitBase):
    """A block built around one network g with Lip(g) < 1."""

    def __init__(self, g: nn.Module, logdet: LogDetSpec = "exact", solver: Optional[SolverOptions] = None,
                 adjoint: Optional[SolverOptions] = None, check_lipschitz: bool = True):
        super().__init__(logdet, solver, adjoint)
        if check_lipschitz:
            check_lipschitz_constrained(g)
        self.g = g


class MonotoneBlock(_SingleNetworkBlock):
    r"""The monotone (Cayley) block :math:`F = 2(\mathrm{Id}+g)^{-1} - \mathrm{Id}` in the scaled form
    :math:`F(x) = \sqrt2\,(\mathrm{Id}+g)^{-1}(\sqrt2\,x) - x`.

    F is m-strongly monotone with :math:`m = (1-L)/(1+L)` and :math:`\mathrm{Lip}(F) \le (1+L)/(1-L)`
    for :math:`L = \mathrm{Lip}(g) < 1`; forward and inverse each cost one fixed-point solve.

    Args:
        g: network with Lip(g) < 1.
        logdet: ``"exact"`` (default, small d), ``"power_series"``, ``"russian_roulette"``,
            ``"neumann"``, an estimator from :mod:`monoflow.logdet`, or ``None`` (not computed).
        solver, adjoint: :class:`~monoflow.solvers.SolverOptions` of the solves and the gradients.
        check_lipschitz: reject g with detectably unconstrained layers.

    Example:
        >>> from monoflow.lipschitz import dense_mlp
        >>> block = MonotoneBlock(dense_mlp(2, 2, 8, "cpila", coeff=0.9, lip_coeff=0.98))
        >>> x = torch.randn(5, 2)
        >>> y, logdet = block(x)
        >>> x_back, inverse_logdet = block.inverse(y)
        >>> torch.allclose(x, x_back, atol=1e-4), torch.allclose(logdet, -inverse_logdet, atol=1e-4)
        (True, True)
    """

    #: :math:`\log|\det F'|` as a series in :math:`J = g'(w)` at the solution: Cayley's.
    series = CAYLEY

    @staticmethod
    def solve_rhs(x: Tensor) -> Tensor:
        r"""The right-hand side :math:`b = \sqrt2\,x` of the solve :math:`w \pm g(w) = b`."""
        return SQRT2 * x

    @staticmethod
    def output(x: Tensor, w: Tensor) -> Tensor:
        r"""The block's value :math:`\sqrt2\,w - x` from its input and the solution w."""
        return SQRT2 * w - x

    def forward(self, x: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        _check_input(x, "MonotoneBlock input")
        _check_like_weights(x, "MonotoneBlock input", self, self.g)
        cache: dict = {}  # the exact log-det's Jacobian at w, reused by a direct adjoint
        w = self._solve(self.g, self.solve_rhs(x), 1.0, "forward", cache, self._exact_logdet(with_logdet))
        return self.output(x, w), self._logdet(self.g, w, self.series, with_logdet, cache)

    def inverse(self, y: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        _check_input(y, "MonotoneBlock.inverse input")
        _check_like_weights(y, "MonotoneBlock.inverse input", self, self.g)
        cache: dict = {}
        w = self._solve(self.g, self.solve_rhs(y), -1.0, "inverse", cache, self._exact_logdet(with_logdet))
        return self.output(y, w), self._logdet(self.g, w, self.series.negated(), with_logdet, cache)


class ResidualBlock(_SingleNetworkBlock):
    r"""Residual block :math:`y = x + g(x)`; inverse by the fixed point :math:`x = y - g(x)`.

    :math:`\log\det(I + J) = \sum_k (-1)^{k+1}\mathrm{tr}(J^k)/k`. Same arguments as
    :class:`MonotoneBlock`.
    """

    #: :math:`\log\det(I + J)` as a series in :math:`J = g'(x)`.
    series = RESIDUAL

    @staticmethod
    def output(x: Tensor, g_x: Tensor) -> Tensor:
        """The block's value :math:`x + g(x)`."""
        return x + g_x

    def forward(self, x: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        _check_input(x, "ResidualBlock input")
        _check_like_weights(x, "ResidualBlock input", self, self.g)
        g_x, logdet = self._value_and_logdet(self.g, x, self.series, with_logdet)
        return self.output(x, g_x), logdet

    def inverse(self, y: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        _check_input(y, "ResidualBlock.inverse input")
        _check_like_weights(y, "ResidualBlock.inverse input", self, self.g)
        cache: dict = {}
        x = self._solve(self.g, y, 1.0, "inverse", cache, self._exact_logdet(with_logdet))
        return x, self._logdet(self.g, x, self.series.negated(), with_logdet, cache)


class ImplicitBlock(_ImplicitBase):
    r"""Implicit block :math:`y = (\mathrm{Id}+g_2)^{-1}(x + g_1(x))`: a residual block followed by an
    inverted residual block. :math:`\log|\det| = \log\det(I+J_1(x)) - \log\det(I+J_2(y))`."""

    def __init__(self, g1: nn.Module, g2: nn.Module, logdet: LogDetSpec = "exact",
                 solver: Optional[SolverOptions] = None, adjoint: Optional[SolverOptions] = None,
                 check_lipschitz: bool = True):
        super().__init__(logdet, solver, adjoint)
        if check_lipschitz:
            check_lipschitz_constrained(g1)
            check_lipschitz_constrained(g2)
        self.g1 = g1
        self.g2 = g2

    def _pair(self, a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
        return None if a is None else a + b

    def forward(self, x: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        _check_input(x, "ImplicitBlock input")
        _check_like_weights(x, "ImplicitBlock input", self, self.g1)
        cache: dict = {}
        g1_x, logdet1 = self._value_and_logdet(self.g1, x, RESIDUAL, with_logdet)
        y = self._solve(self.g2, x + g1_x, 1.0, "forward", cache, self._exact_logdet(with_logdet))
        return y, self._pair(logdet1, self._logdet(self.g2, y, RESIDUAL.negated(), with_logdet, cache))

    def inverse(self, y: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        _check_input(y, "ImplicitBlock.inverse input")
        _check_like_weights(y, "ImplicitBlock.inverse input", self, self.g1)
        cache: dict = {}
        g2_y, logdet2 = self._value_and_logdet(self.g2, y, RESIDUAL, with_logdet)
        x = self._solve(self.g1, y + g2_y, 1.0, "inverse", cache, self._exact_logdet(with_logdet))
        return x, self._pair(self._logdet(self.g1, x, RESIDUAL.negated(), with_logdet, cache), logdet2)


class ActNorm(FlowBlock):
    r"""Per-channel affine map :math:`y = (x + b)\,e^{s}` along dim 1.

    Initialised from the first batch it sees so that its output has zero mean and unit variance
    per channel (with ``torch.distributed`` initialised, the statistics are averaged over all
    ranks, so every rank starts from the same values). :math:`\log|\det| = \sum_c s_c` times the
    number of positions per channel.

    The first batch must be a non-empty floating-point tensor of finite values (anything else
    would set NaN or arbitrary scales, for good); a refused batch leaves the layer uninitialised.
    A channel without spread in the first batch (a batch of one, a constant feature) is only
    centred: its scale starts at 1 instead of :math:`1/\sqrt{\text{eps}}`.
    """

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_features = num_features
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))

    def _shape(self, x: Tensor) -> Tuple[int, ...]:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"ActNorm({self.num_features}) expects input of shape (batch, {self.num_features}, ...), "
                f"got {tuple(x.shape)}"
            )
        return (1, self.num_features) + (1,) * (x.dim() - 2)

    def _check(self, x: Tensor, what: str) -> Tuple[int, ...]:
        if not torch.is_tensor(x):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
        shape = self._shape(x)
        _check_like_weights(x, what, self)
        return shape

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        if x.shape[0] == 0:
            raise ValueError("ActNorm's data-dependent initialisation needs a non-empty first batch, got shape "
                             f"{tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("ActNorm's data-dependent initialisation got a first batch with non-finite values "
                             "(nan or inf); it stays uninitialised")
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor(float(x.numel() // self.num_features), dtype=x.dtype, device=x.device)
        moments = torch.stack([x.sum(dim=dims), (x * x).sum(dim=dims)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(moments)
            dist.all_reduce(count)
        mean = moments[0] / count
        var = (moments[1] / count - mean * mean).clamp_min(0.0)
        self.bias.copy_(-mean)
        # no spread (one sample, a constant channel): centre only, rather than scale by 1/sqrt(eps)
        self.log_scale.copy_(torch.where(var > self.eps, -0.5 * torch.log(var + self.eps), torch.zeros_like(var)))
        self.initialized.fill_(True)

    def _logdet(self, x: Tensor) -> Tensor:
        positions = x[0, 0].numel()
        return (self.log_scale.sum() * positions).expand(x.shape[0])

    def forward(self, x: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        shape = self._check(x, "ActNorm input")
        if not bool(self.initialized):
            self._initialize(x)
        y = (x + self.bias.view(shape)) * self.log_scale.view(shape).exp()
        return y, self._logdet(x) if with_logdet else None

    def inverse(self, y: Tensor, with_logdet: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        shape = self._check(y, "ActNorm.inverse input")
        if not bool(self.initialized):
            raise RuntimeError("ActNorm.inverse called before initialisation: run a forward pass on data first")
        x = y * (-self.log_scale.view(shape)).exp() - self.bias.view(shape)
        return x, -self._logdet(y) if with_logdet else None


def solver_stats(model: nn.Module) -> Dict[str, float]:
    """Aggregate the last solves of every block in ``model``.

    Returns ``{kind}_iterations_mean``, ``{kind}_iterations_max``, ``{kind}_evaluations`` (mean over
    blocks), ``{kind}_residual_max`` and ``{kind}_converged_fraction`` (min over blocks) for
    kind in forward, inverse, adjoint, for the kinds that ran.
    """
    collected: Dict[str, list] = {}
    for module in model.modules():
        for kind, info in getattr(module, "last_solves", {}).items():
            collected.setdefault(kind, []).append(info.summary())
    stats: Dict[str, float] = {}
    for kind, summaries in collected.items():
        n = len(summaries)
        stats[f"{kind}_iterations_mean"] = sum(s["iterations_mean"] for s in summaries) / n
        stats[f"{kind}_iterations_max"] = max(s["iterations_max"] for s in summaries)
        stats[f"{kind}_evaluations"] = sum(s["evaluations"] for s in summaries) / n
        stats[f"{kind}_residual_max"] = max(s["residual_max"] for s in summaries)
        stats[f"{kind}_converged_fraction"] = min(s["converged_fraction"] for s in summaries)
    return stats

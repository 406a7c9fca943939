r"""Batched fixed-point iteration with Anderson acceleration.

Solves :math:`z = f(z)` for a batch of independent problems (one per sample). Each sample stops on
its own once

.. math:: \|f(z_i) - z_i\| \le \text{atol}\sqrt{n} + \text{rtol}\,\|f(z_i)\|,

with :math:`n` the number of elements of one sample, so ``atol`` is a per-element tolerance and
``rtol`` is relative to the size of the solution (never to the starting point). Converged samples
are frozen and no longer evaluated (unless ``freeze_converged=False``). What happens when a sample does not converge within
``max_iterations`` is the caller's choice (``on_failure``): ``"warn"`` (default), ``"raise"``
(:class:`SolverError`) or ``"nan"`` (the unconverged samples are set to NaN). It is never silent:
:class:`SolverInfo` always reports iterations, residuals and convergence per sample. A sample
whose residual or solution norm is infinite or NaN (an overflow, a non-finite input) has not
converged, whatever the tolerance test says (``inf <= inf`` holds), so the failure policy acts on it.

Example:
    >>> import torch
    >>> f = lambda z, index: 0.5 * torch.cos(z)
    >>> z, info = fixed_point_solve(f, torch.zeros(3, 2))
    >>> bool(info.converged.all()), torch.allclose(z, 0.5 * torch.cos(z), atol=1e-5)
    (True, True)
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

__all__ = [
    "SolverOptions",
    "SolverInfo",
    "SolverError",
    "SolverWarning",
    "fixed_point_solve",
    "default_tolerances",
    "resolve_tolerances",
    "report_failure",
]

FAILURE_POLICIES = ("warn", "raise", "nan")
METHODS = ("anderson", "picard", "direct", "scalar")
STARTS = ("rhs", "newton")


class SolverError(RuntimeError):
    """A fixed-point solve did not converge and the policy was ``on_failure="raise"``."""


class SolverWarning(RuntimeWarning):
    """A fixed-point solve did not converge and the policy was ``on_failure="warn"``."""


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) that the dtype can reach with margin: 1e-6/1e-5 in float32, 1e-12/1e-10 in float64."""
    if dtype == torch.float64:
        return 1e-12, 1e-10
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-3, 1e-2
    return 1e-6, 1e-5


@dataclass(frozen=True)
class SolverOptions:
    """Settings of one fixed-point solve.

    Args:
        method: ``"anderson"`` (accelerated, default), ``"picard"`` (plain iteration) or, for
            adjoint solves of flat inputs whose g provides ``jacobian(w)``, ``"direct"``: a dense
            per-sample linear solve with the Jacobian (one Jacobian pass, no iterations).
            For resolvent solves of one element per sample, ``"scalar"``: tabulate
            z + s g(z), interpolate and bracket (:mod:`monoflow.scalar_resolvent`).
        atol: per-element absolute tolerance; ``None`` picks one the dtype can reach.
        rtol: tolerance relative to the norm of the solution; ``None`` picks one by dtype.
        max_iterations: cap on iterations (evaluations of f) per solve.
        history: number of past iterates Anderson mixes.
        regularization: relative Tikhonov term of Anderson's least-squares problem.
        on_failure: ``"warn"``, ``"raise"`` or ``"nan"`` for samples that do not converge.
        table_points: grid points of the ``"scalar"`` method's table.
        start: where a resolvent solve :math:`z + s\\,g(z) = b` starts: ``"rhs"`` (default),
            :math:`z_0 = b`; or ``"newton"``, ``newton_steps`` Newton steps from b,
            :math:`z \\leftarrow z - (I + s J(z))^{-1} (z + s\\,g(z) - b)`, for flat inputs whose
            g provides ``jacobian(w)`` (the toy models): Jacobian passes that save several
            iterations. The stopping test is the same, so the solution is too, within the tolerance.
        newton_steps: Newton steps of the ``"newton"`` start (default 2).
        freeze_converged: stop evaluating samples once they converge (default). With ``False``
            f always sees the whole batch (for maps that need every row in its place, such as an
            ensemble of networks that sends each block of rows to its own member); a converged
            sample is then held at its converged iterate, so the results are those of the
            default.
    """

    method: str = "anderson"
    atol: Optional[float] = None
    rtol: Optional[float] = None
    max_iterations: int = 100
    history: int = 5
    regularization: float = 1e-8
    on_failure: str = "warn"
    freeze_converged: bool = True
    table_points: int = 512
    start: str = "rhs"
    newton_steps: int = 2

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown solver method {self.method!r}; expected one of {METHODS}")
        if self.on_failure not in FAILURE_POLICIES:
            raise ValueError(
                f"unknown on_failure policy {self.on_failure!r}; expected one of {FAILURE_POLICIES}"
            )
        if self.start not in STARTS:
            raise ValueError(f"unknown solver start {self.start!r}; expected one of {STARTS}")
        if self.newton_steps < 1:
            raise ValueError(f"newton_steps must be >= 1, got {self.newton_steps}")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")
        if self.table_points < 2:
            raise ValueError(f"table_points must be >= 2, got {self.table_points}")
        if self.history < 1:
            raise ValueError(f"history must be >= 1, got {self.history}")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")

    def with_(self, **changes) -> "SolverOptions":
        """A copy with some fields changed."""
        return replace(self, **changes)


@dataclass
class SolverInfo:
    """Diagnostics of one batched solve.

    Attributes:
        iterations: evaluations of f for each sample, shape (batch,).
        residual: final :math:`\\|f(z_i) - z_i\\|` per sample, shape (batch,).
        converged: whether each sample met its tolerance, shape (batch,).
        evaluations: number of calls of f (each on the samples still active).

    A sample with a non-finite residual is never ``converged`` (enforced here, whoever builds
    the record).
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    evaluations: int

    def __post_init__(self) -> None:
        self.converged = self.converged & torch.isfinite(self.residual).reshape(self.converged.shape)

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def summary(self) -> Dict[str, float]:
        """Plain numbers for logs: mean/max iterations, max residual, converged fraction."""
        iterations = self.iterations.double()
        return {
            "iterations_mean": float(iterations.mean()) if iterations.numel() else 0.0,
            "iterations_max": float(iterations.max()) if iterations.numel() else 0.0,
            "evaluations": float(self.evaluations),
            "residual_max": float(self.residual.max()) if self.residual.numel() else 0.0,
            "converged_fraction": float(self.converged.double().mean()) if self.converged.numel() else 1.0,
        }


def resolve_tolerances(options: SolverOptions, dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) of ``options``, the dtype's defaults where they are ``None``."""
    atol, rtol = default_tolerances(dtype)
    return (options.atol if options.atol is not None else atol,
            options.rtol if options.rtol is not None else rtol)


def report_failure(info: "SolverInfo", options: SolverOptions, atol: float, rtol: float,
                   solution: Tensor) -> None:
    """Apply ``options.on_failure`` to the samples that did not converge (``"nan"`` writes NaN
    into ``solution`` in place)."""
    if info.all_converged:
        return
    converged = info.converged
    message = (
        f"fixed-point solve did not converge for {int((~converged).sum())} of {converged.numel()} samples "
        f"within {options.max_iterations} iterations (max residual {float(info.residual.max()):.3g}, "
        f"atol {atol:g}, rtol {rtol:g}); "
        + ("the residual is not finite (an overflow, or a non-finite input?)"
           if not bool(torch.isfinite(info.residual).all()) else
           "is Lip(g) < 1, or are the inputs too large for the dtype (an overflowing norm)?")
    )
    if options.on_failure == "raise":
        raise SolverError(message)
    if options.on_failure == "nan":
        solution[~converged] = float("nan")
    else:
        warnings.warn(message, SolverWarning, stacklevel=4)


def _anderson_step(X: Tensor, F: Tensor, count: int, regularization: float) -> Tensor:
    """Anderson mixing of the last ``count`` iterates: minimise ||sum a_j (F_j - X_j)|| with sum a_j = 1."""
    G = (F[:, :count] - X[:, :count]).double()  # (b, m, n)
    gram = G @ G.transpose(1, 2)  # (b, m, m)
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-300)
    eye = torch.eye(count, dtype=gram.dtype, device=gram.device)
    gram = gram + (regularization * scale)[:, None, None] * eye
    ones = torch.ones(gram.shape[0], count, 1, dtype=gram.dtype, device=gram.device)
    # a = H^-1 1 / (1^T H^-1 1): the constrained least-squares solution.
    solution = torch.linalg.solve(gram, ones)
    alpha = solution / solution.sum(dim=1, keepdim=True)
    return (alpha.transpose(1, 2).to(F.dtype) @ F[:, :count]).squeeze(1)


def _check_solvable(options: SolverOptions, z0: Tensor) -> None:
    """Reject the methods that are not fixed-point iterations and an empty batch."""
    if options.method == "direct":
        raise ValueError("method='direct' needs a dense Jacobian: it is only for adjoint solves")
    if options.method == "scalar":
        raise ValueError("method='scalar' tabulates z + s g(z): it is only for resolvent solves "
                         "(monoflow.implicit.solve_resolvent) of one element per sample")
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise ValueError(f"fixed_point_solve needs a batch of at least one sample, got shape {tuple(z0.shape)}")


def _converged(res: Tensor, reference: Tensor, atol: float, rtol: float, n: int) -> Tensor:
    """The per-sample stopping test ``res <= atol sqrt(n) + rtol reference``, false where a norm is
    not finite."""
    # an overflowing norm makes the test vacuous (inf <= inf, or r <= rtol * inf): not converged,
    # unless the iterate is an exact fixed point
    return torch.isfinite(res) & ((res == 0) | (torch.isfinite(reference)
                                                & (res <= atol * math.sqrt(n) + rtol * reference)))


class _Iteration:
    """The state of one batched fixed-point iteration.

    The outputs (``solution``, ``residual``, ``iterations``, ``converged``) cover the whole batch;
    the iterate ``x`` and the Anderson histories ``X``, ``F`` cover only the ``active`` samples,
    compacted whenever samples converge (with ``freeze_converged``). Without it every row stays
    active and ``held`` marks the rows frozen at their converged iterate.
    """

    def __init__(self, z0: Tensor, options: SolverOptions) -> None:
        batch = z0.shape[0]
        device = z0.device
        self.options = options
        self.batch = batch
        self.sample_shape = z0.shape[1:]
        self.n = max(1, math.prod(self.sample_shape))
        self.solution = z0.detach().clone()
        self.residual = torch.full((batch,), float("inf"), device=device, dtype=z0.dtype)
        self.iterations = torch.zeros(batch, dtype=torch.long, device=device)
        self.converged = torch.zeros(batch, dtype=torch.bool, device=device)
        self.active = torch.arange(batch, device=device)
        self.m = options.history if options.method == "anderson" else 1
        self.X = torch.zeros(batch, self.m, self.n, dtype=z0.dtype, device=device)
        self.F = torch.zeros_like(self.X)
        self.x = z0.detach().reshape(batch, self.n)
        self.evaluations = 0
        self.held = torch.zeros(batch, dtype=torch.bool, device=device)

    def evaluate(self, f: Callable[[Tensor, Optional[Tensor]], Tensor]) -> tuple[Optional[Tensor], Tensor]:
        """``(index, f(x))`` on the active samples, flattened (index ``None``: the whole batch)."""
        count = self.active.numel()
        index = None if count == self.batch else self.active
        fx = f(self.x.reshape((count,) + self.sample_shape), index).detach().reshape(count, self.n)
        self.evaluations += 1
        return index, fx

    def record(self, fx: Tensor, res: Tensor, done: Tensor, index: Optional[Tensor]) -> Tensor:
        """Write this iteration's outputs of the samples that moved; returns which samples are done."""
        if not self.options.freeze_converged:
            # every row is evaluated, but rows that converged are held at their converged
            # iterate (their outputs and diagnostics are those of that iteration)
            moving = ~self.held
            self.iterations[moving] += 1
            self.solution[moving] = fx[moving].reshape((-1,) + self.sample_shape)
            self.residual[moving], self.converged[moving] = res[moving], done[moving]
            self.held = self.held | done
            return self.held
        if index is None:
            self.iterations += 1
            self.solution = fx.reshape(self.solution.shape)
            self.residual, self.converged = res, done
        else:
            active = self.active
            self.iterations[active] += 1
            self.solution[active] = fx.reshape((active.numel(),) + self.sample_shape)
            self.residual[active] = res
            self.converged[active] = done
        return done

    def drop(self, keep: Tensor, fx: Tensor, index: Optional[Tensor]) -> Tensor:
        """Stop iterating the samples not in ``keep``; returns ``fx`` of the samples kept."""
        self.active, self.x, fx, self.X, self.F = (self.active[keep], self.x[keep], fx[keep],
                                                   self.X[keep], self.F[keep])
        if index is None:  # from here on the outputs are written by index
            self.solution, self.residual, self.converged = (self.solution.clone(), self.residual.clone(),
                                                            self.converged.clone())
        return fx

    def advance(self, fx: Tensor, k: int) -> None:
        """Store iteration ``k`` in the histories and take the next iterate (Picard or Anderson)."""
        slot = k % self.m
        self.X[:, slot] = self.x
        self.F[:, slot] = fx
        count = min(k + 1, self.m)
        if self.options.method == "picard" or count < 2:
            x = fx
        else:
            # ring buffer: the order of the stored iterates does not matter to the least squares
            x = _anderson_step(self.X, self.F, count, self.options.regularization)
            bad = ~torch.isfinite(x).all(dim=1)
            if bool(bad.any()):
                x[bad] = fx[bad]
        if not self.options.freeze_converged and bool(self.held.any()):
            x = torch.where(self.held[:, None], self.X[:, slot], x)
        self.x = x


def fixed_point_solve(
    f: Callable[[Tensor, Optional[Tensor]], Tensor],
    z0: Tensor,
    options: Optional[SolverOptions] = None,
    scale: Optional[Tensor] = None,
) -> tuple[Tensor, SolverInfo]:
    r"""Solve :math:`z = f(z)` sample by sample.

    Args:
        f: ``f(z, index)`` evaluates the map on the samples ``index`` (a LongTensor into the batch,
            or ``None`` for all of them) at the points ``z`` (those samples only).
        z0: starting point, shape (batch, ...).
        options: :class:`SolverOptions`; defaults if ``None``.
        scale: optional per-sample norms (batch,) used instead of :math:`\|f(z_i)\|` in the relative
            test (the adjoint solve measures relative to the incoming gradient).

    Returns:
        ``(z, info)``: the last evaluated iterate :math:`f(z)` of each sample and its diagnostics.
    """
    options = options or SolverOptions()
    _check_solvable(options, z0)
    atol, rtol = resolve_tolerances(options, z0.dtype)
    state = _Iteration(z0, options)
    for k in range(options.max_iterations):
        index, fx = state.evaluate(f)
        res = (fx - state.x).norm(dim=1)
        reference = fx.norm(dim=1) if scale is None else scale[state.active]
        done = state.record(fx, res, _converged(res, reference, atol, rtol, state.n), index)
        if bool(done.all()):
            break
        if options.freeze_converged and bool(done.any()):
            fx = state.drop(~done, fx, index)
        state.advance(fx, k)

    info = SolverInfo(iterations=state.iterations, residual=state.residual, converged=state.converged,
                      evaluations=state.evaluations)
    # called from here, not from a helper: the warning's stacklevel points at the solve's caller
    report_failure(info, options, atol, rtol, state.solution)
    return state.solution, info

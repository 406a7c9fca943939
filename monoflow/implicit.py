r"""Resolvent solves with implicit gradients.

:func:`solve_resolvent` returns :math:`z = (\mathrm{Id} + s\,g)^{-1}(b)`, i.e. the solution of

.. math:: z + s\,g(z) = b, \qquad s = \pm 1,

found by the fixed-point iteration :math:`z \leftarrow b - s\,g(z)` (a contraction when
:math:`\mathrm{Lip}(g) < 1`). The solve itself runs without autograd. Gradients come from the
implicit function theorem (SPEC.md section 2): with :math:`J = \partial g/\partial z` at the
solution and :math:`v = \partial\mathcal{L}/\partial z`, the adjoint :math:`u` solves

.. math:: u^\top (I + s J) = v^\top \iff u = v - s J^\top u,

again by fixed-point iteration on vector-Jacobian products, and then
:math:`\partial\mathcal{L}/\partial b = u`, :math:`\partial\mathcal{L}/\partial\theta = -s\,u^\top
\partial g/\partial\theta`. Nothing is unrolled through the iterations.

Every block that inverts something (monotone forward and inverse, residual inverse, implicit
blocks) goes through this one function.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from monoflow.scalar_resolvent import scalar_resolvent_solve
from monoflow.solvers import SolverInfo, SolverOptions, fixed_point_solve

__all__ = ["solve_resolvent", "solve_small", "newton_start", "DEFAULT_FORWARD", "DEFAULT_ADJOINT"]

#: forward solves: tolerances chosen by dtype (float32 reachable), generous cap
DEFAULT_FORWARD = SolverOptions()
#: adjoint solves: relative to the incoming gradient, a tolerance float32 can reach
DEFAULT_ADJOINT = SolverOptions(atol=0.0)

StatsSink = Optional[Callable[[str, SolverInfo], None]]


def solve_small(matrix: Tensor, rhs: Tensor) -> Tensor:
    """``matrix^-1 rhs`` for batches of d x d matrices (B, d, d) and vectors (B, d); closed form for d <= 2."""
    d = matrix.shape[-1]
    if d == 1:
        return rhs / matrix[:, 0]
    if d == 2:
        a, b, c, e = matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 1, 0], matrix[:, 1, 1]
        det = a * e - b * c
        return torch.stack([e * rhs[:, 0] - b * rhs[:, 1], a * rhs[:, 1] - c * rhs[:, 0]], dim=1) / det[:, None]
    return torch.linalg.solve(matrix, rhs.unsqueeze(-1)).squeeze(-1)


def _direct_adjoint(g: nn.Module, z_star: Tensor, v: Tensor, sign: float,
                    jacobian_cache: Optional[dict]) -> Tuple[Tensor, SolverInfo]:
    """u = (I + s J^T)^-1 v with the dense per-sample Jacobian J = g.jacobian(z*) (taken from
    ``jacobian_cache["jacobian"]`` when the exact log-det already computed it at the solution)."""
    if z_star.dim() != 2 or not hasattr(g, "jacobian"):
        raise ValueError(
            "adjoint method 'direct' needs flat inputs (batch, d) and a g with a jacobian(w) method; "
            f"got input shape {tuple(z_star.shape)} and {type(g).__name__}"
        )
    with torch.no_grad():
        J = (jacobian_cache or {}).get("jacobian")
        if J is None:
            _, J = g.jacobian(z_star)
        eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
        u = solve_small(eye + sign * J.transpose(1, 2), v)
        residual = (u + sign * (J.transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1) - v).norm(dim=1)
    batch = v.shape[0]
    info = SolverInfo(
        iterations=torch.ones(batch, dtype=torch.long, device=v.device),
        residual=residual,
        converged=torch.isfinite(residual),
        evaluations=1,
    )
    return u, info


def newton_start(g: nn.Module, b: Tensor, sign: float, steps: int) -> Tensor:
    r"""``steps`` Newton steps for :math:`z + s\,g(z) = b` from :math:`z = b`,
    :math:`z \leftarrow z - (I + s J(z))^{-1} (z + s\,g(z) - b)` (``SolverOptions(start="newton")``; the
    compiled loss starts its solves with it too)."""
    if b.dim() != 2 or not hasattr(g, "jacobian"):
        raise ValueError(
            "solver start 'newton' needs flat inputs (batch, d) and a g with a jacobian(w) method; "
            f"got input shape {tuple(b.shape)} and {type(g).__name__}"
        )
    fused = getattr(g, "fused_newton", None)
    z = None if fused is None else fused(b, sign, steps)  # one kernel call for the whole start, where it applies
    if z is not None:
        return z
    eye = torch.eye(b.shape[1], dtype=b.dtype, device=b.device)
    z = b
    for _ in range(steps):
        value, jac = g.jacobian(z)
        z = z - solve_small(eye + sign * jac, z + sign * value - b)
    return z


def _needs_graph(b: Tensor, g: nn.Module) -> bool:
    if not torch.is_grad_enabled():
        return False
    return b.requires_grad or any(p.requires_grad for p in g.parameters())


def _checked_options(sign: float, forward: Optional[SolverOptions],
                     adjoint: Optional[SolverOptions]) -> Tuple[SolverOptions, SolverOptions]:
    """The forward and adjoint settings, defaults where ``None``, after checking the sign and that
    the adjoint (a linear solve) does not ask for the ``"scalar"`` method."""
    if sign not in (1.0, -1.0, 1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    forward = forward or DEFAULT_FORWARD
    adjoint = adjoint or DEFAULT_ADJOINT
    if adjoint.method == "scalar":
        raise ValueError("the adjoint solve is linear: use method 'direct', 'anderson' or 'picard' for it, not 'scalar'")
    return forward, adjoint


def _takes_jacobian(g: nn.Module, z_star: Tensor, adjoint: SolverOptions, jacobian_at_solution: bool) -> bool:
    """Whether the graph evaluation at the solution also leaves the Jacobian for a direct adjoint."""
    return (jacobian_at_solution and adjoint.method == "direct" and hasattr(g, "jacobian")
            and z_star.dim() == 2)


def _one_pass(g: nn.Module) -> Optional[Callable[[Tensor], Optional[Tuple[Tensor, Tensor]]]]:
    """``g.value_and_detached_jacobian``: where it returns a pair, the value with its graph and the
    detached Jacobian in about the cost of a value and one vector-Jacobian product."""
    return getattr(g, "value_and_detached_jacobian", None)


def _cache_jacobian(jacobian_cache: Optional[dict], jacobian: Tensor) -> dict:
    jacobian_cache = {} if jacobian_cache is None else jacobian_cache
    jacobian_cache["jacobian"] = jacobian.detach()
    return jacobian_cache


def _evaluate_at_solution(g: nn.Module, z_star: Tensor, adjoint: SolverOptions, jacobian_cache: Optional[dict],
                          jacobian_at_solution: bool) -> Tuple[Tensor, Tensor, Optional[dict]]:
    """``(z_leaf, g(z_leaf), jacobian_cache)``: one evaluation of g at the solution, with graph.

    It carries the graph to b and the parameters; its dependence on ``z_leaf`` serves the
    vector-Jacobian products of an iterative adjoint. With ``jacobian_at_solution`` and a direct
    adjoint it also leaves the detached Jacobian in ``jacobian_cache`` (a new dict if ``None``).
    """
    take_jacobian = _takes_jacobian(g, z_star, adjoint, jacobian_at_solution)
    one_pass = _one_pass(g) if take_jacobian else None
    z_leaf = z_star.detach()
    pair = None if one_pass is None else one_pass(z_leaf)
    # else, of a scalar map, one vector-Jacobian product is the whole (1 x 1) Jacobian, cheaper than
    # propagating it forward through the layers
    scalar_jacobian = take_jacobian and pair is None and z_star.shape[1] == 1
    z_leaf.requires_grad_(adjoint.method != "direct" or scalar_jacobian)
    if pair is not None:
        g_star, J = pair
    elif scalar_jacobian:
        g_star = g(z_leaf)
        (slope,) = torch.autograd.grad(g_star, z_leaf, torch.ones_like(g_star), retain_graph=True)
        J = slope.unsqueeze(-1)
    elif take_jacobian:
        g_star, J = g.jacobian(z_leaf)
    else:
        g_star = g(z_leaf)
    if take_jacobian:
        jacobian_cache = _cache_jacobian(jacobian_cache, J)
    return z_leaf, g_star, jacobian_cache


class _FirstEvaluation:
    r"""The scalar solve's first evaluation of g, at the first false-position points :math:`z_1`,
    recorded with its graph and Jacobian (:func:`_one_pass`). A sample that converges there has
    the solution :math:`b - s\,g(z_1)`, which is then also its graph evaluation: the separate
    evaluation at the solution is saved for all but the few samples that iterate further."""

    def __init__(self, one_pass: Callable[[Tensor], Optional[Tuple[Tensor, Tensor]]], g: nn.Module) -> None:
        self.one_pass, self.g = one_pass, g
        self.pair: Optional[Tuple[Tensor, Tensor]] = None

    def __call__(self, z: Tensor) -> Tensor:
        with torch.enable_grad():
            self.pair = self.one_pass(z)
        return self.g(z) if self.pair is None else self.pair[0].detach()

    def graph_at_solution(self, z_star: Tensor, info: SolverInfo, jacobian_cache: Optional[dict]
                          ) -> Optional[Tuple[Tensor, Tensor, dict]]:
        """``(z_leaf, g_star, jacobian_cache)`` as :func:`_evaluate_at_solution` returns them, with the
        samples that needed more than one iteration evaluated again at their solution; ``None`` where
        the first evaluation recorded no graph."""
        if self.pair is None:
            return None
        g_star, jacobian = self.pair
        again = ((info.iterations > 1) | ~info.converged).nonzero().squeeze(1)
        if again.numel():
            pair = self.one_pass(z_star[again])
            if pair is None:
                return None
            g_star = g_star.index_put((again,), pair[0])
            jacobian = jacobian.index_put((again,), pair[1])
        return z_star.detach(), g_star, _cache_jacobian(jacobian_cache, jacobian)


def _adjoint_hook(g: nn.Module, z_star: Tensor, z_leaf: Tensor, g_star: Tensor, sign: float,
                  adjoint: SolverOptions, jacobian_cache: Optional[dict],
                  record: StatsSink) -> Callable[[Optional[Tensor]], Optional[Tensor]]:
    r"""The gradient hook of ``z = b - s g(z*)``: it replaces the incoming gradient v by the
    adjoint solution u of :math:`u = v - s J^\top u` (direct, or by fixed-point iteration on
    vector-Jacobian products of ``g_star`` at ``z_leaf``), which autograd then sends on to b and,
    through ``g_star``, to the parameters."""

    def adjoint_hook(v: Optional[Tensor]) -> Optional[Tensor]:
        if v is None:
            return None
        batch = v.shape[0]

        def adjoint_step(u: Tensor, index: Optional[Tensor]) -> Tensor:
            if index is None:
                full = u
            else:
                full = torch.zeros_like(v)
                full[index] = u
            (vjp,) = torch.autograd.grad(g_star, z_leaf, full, retain_graph=True)
            out = v - sign * vjp
            return out if index is None else out[index]

        if adjoint.method == "direct":
            u, adjoint_info = _direct_adjoint(g, z_star, v, sign, jacobian_cache)
        else:
            scale = v.reshape(batch, -1).norm(dim=1)
            u, adjoint_info = fixed_point_solve(adjoint_step, v, adjoint, scale=scale)
        if record is not None:
            record("adjoint", adjoint_info)
        return u

    return adjoint_hook


def solve_resolvent(
    g: nn.Module,
    b: Tensor,
    sign: float = 1.0,
    forward: Optional[SolverOptions] = None,
    adjoint: Optional[SolverOptions] = None,
    z0: Optional[Tensor] = None,
    record: StatsSink = None,
    name: str = "forward",
    jacobian_cache: Optional[dict] = None,
    jacobian_at_solution: bool = False,
) -> Tensor:
    r"""Solve :math:`z + s\,g(z) = b` with implicit-function gradients.

    Args:
        g: the network, Lip(g) < 1, acting sample by sample.
        b: right-hand side, shape (batch, ...).
        sign: :math:`s`, +1 or -1.
        forward, adjoint: solver settings of the solve and of the gradient's adjoint solve.
        z0: starting point (default ``b``, the solution for g = 0, or with
            ``forward.start == "newton"`` ``forward.newton_steps`` Newton steps from it); the ``"scalar"`` method
            brackets the solution from a table instead and takes no starting point.
        record: called as ``record(name, info)`` after the solve and
            ``record("adjoint", info)`` after each adjoint solve.
        name: the label passed to ``record`` for the solve.
        jacobian_cache: a dict in which a log-det estimator may leave the (detached) Jacobian at
            the solution under ``"jacobian"``; the ``"direct"`` adjoint then reuses it.
        jacobian_at_solution: with the ``"direct"`` adjoint and a g that propagates Jacobians,
            take the Jacobian from the graph evaluation at the solution (``g.jacobian``: one
            pass instead of a second one in the backward); for callers whose log-det estimator
            will not supply it.

    Returns:
        z, differentiable with respect to ``b`` and the parameters of g.
    """
    forward, adjoint = _checked_options(sign, forward, adjoint)
    b_const = b.detach()

    def step(z: Tensor, index: Optional[Tensor]) -> Tensor:
        rhs = b_const if index is None else b_const[index]
        return rhs - sign * g(z)

    # the solvers are called from here, not from a helper: their failure warnings' stacklevel
    # points at the caller of this function
    first = None
    if forward.method == "scalar" and _needs_graph(b, g) and _takes_jacobian(g, b_const, adjoint, jacobian_at_solution):
        one_pass = _one_pass(g)
        first = None if one_pass is None else _FirstEvaluation(one_pass, g)
    with torch.no_grad():
        if forward.method == "scalar":
            z_star, info = scalar_resolvent_solve(g, b_const, sign, forward, first_evaluation=first)
        elif z0 is None and forward.start == "newton":
            z_star, info = fixed_point_solve(step, newton_start(g, b_const, sign, forward.newton_steps), forward)
            info = replace(info, evaluations=info.evaluations + forward.newton_steps)  # the start's Jacobian passes
        else:
            z_star, info = fixed_point_solve(step, b_const if z0 is None else z0.detach(), forward)
    if record is not None:
        record(name, info)
    if not _needs_graph(b, g):
        return z_star

    evaluated = None if first is None else first.graph_at_solution(z_star, info, jacobian_cache)
    z_leaf, g_star, jacobian_cache = evaluated or _evaluate_at_solution(g, z_star, adjoint, jacobian_cache,
                                                                        jacobian_at_solution)
    z = b - sign * g_star
    z.register_hook(_adjoint_hook(g, z_star, z_leaf, g_star, sign, adjoint, jacobian_cache, record))
    # Return a view: vector-Jacobian products taken *with respect to* the returned tensor (the
    # log-det estimators differentiate g at it) must not trigger the adjoint hook; only gradients
    # flowing back through it to b and the parameters do.
    return z.view_as(z)

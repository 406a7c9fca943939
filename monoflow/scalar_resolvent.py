r"""Resolvent solves of one number per sample: tabulate, interpolate, bracket.

For samples of a single element, :math:`h(z) = z + s\,g(z)` is one function
:math:`\mathbb{R}\to\mathbb{R}` shared by the whole batch, and strictly increasing
(:math:`h' \ge 1 - \mathrm{Lip}(g) > 0`). So instead of iterating every sample from its own
right-hand side, :func:`scalar_resolvent_solve`

1. evaluates h once on a grid of ``options.table_points`` points that brackets every
   :math:`b_i` (widened until :math:`h(z_0) \le \min b` and :math:`h(z_N) \ge \max b`),
2. finds each :math:`b_i`'s grid interval (``searchsorted``), so that
   :math:`h(z_l) \le b_i \le h(z_r)`,
3. runs regula falsi with the Illinois rule inside that bracket until
   :math:`|f(z) - z| \le \text{atol} + \text{rtol}\,|f(z)|` with :math:`f(z) = b - s\,g(z)`,
   the tolerance of :func:`monoflow.solvers.fixed_point_solve`.

Where g is linear on the interval (a ReLU network is piecewise linear) the first interpolation
is the solution, so most samples need one evaluation of g; a bracket can never be lost, so the
iteration converges however close :math:`\mathrm{Lip}(g)` is to 1, where the fixed-point
iteration contracts only by :math:`\mathrm{Lip}(g)` per step. Select it with
``SolverOptions(method="scalar")``; gradients are unchanged (the implicit ones of
:func:`monoflow.implicit.solve_resolvent`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from monoflow.solvers import SolverInfo, SolverOptions, report_failure, resolve_tolerances

__all__ = ["scalar_resolvent_solve"]

#: how many times the tabulated interval may double before the solve gives up on bracketing
MAX_WIDENINGS = 60


def _bracketing_table(h: Callable[[Tensor], Tensor], b: Tensor, points: int) -> tuple[Tensor, Tensor, int]:
    """Grid z (points,) and h(z), widened until the table brackets every entry of b."""
    low, high = float(b.min()), float(b.max())
    margin = 0.1 * (high - low) + 0.1
    for widening in range(1, MAX_WIDENINGS + 1):
        grid = torch.linspace(low - margin, high + margin, points, dtype=b.dtype, device=b.device)
        table = h(grid)
        if not bool(torch.isfinite(table).all()):
            raise ValueError("scalar resolvent solve: g returned non-finite values on the bracketing grid")
        if float(table[0]) <= low and float(table[-1]) >= high:
            return grid, table, widening
        margin *= 2.0
    raise ValueError(
        f"scalar resolvent solve: no grid within +-{margin:.3g} of the right-hand sides brackets them; "
        "is z + s g(z) increasing (Lip(g) < 1)?"
    )


def _grid_brackets(grid: Tensor, table: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(z_left, z_right, r_left, r_right)``: each right-hand side's grid interval and the residuals
    h(z) - b at its ends (``r_left <= 0 <= r_right``)."""
    right = torch.searchsorted(table.contiguous(), rhs.contiguous()).clamp(1, grid.shape[0] - 1)
    z_left, z_right = grid[right - 1], grid[right]
    r_left, r_right = table[right - 1] - rhs, table[right] - rhs
    return z_left, z_right, r_left, r_right


def _false_position(z_left: Tensor, z_right: Tensor, r_left: Tensor, r_right: Tensor) -> Tensor:
    """The zero of the secant through the bracket's ends (its midpoint where that is not finite)."""
    z = z_left - r_left * (z_right - z_left) / (r_right - r_left)
    return torch.where(torch.isfinite(z), z, 0.5 * (z_left + z_right))


def _illinois_update(z: Tensor, r: Tensor, z_left: Tensor, z_right: Tensor, r_left: Tensor, r_right: Tensor,
                     last_side: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The brackets ``(z_left, z_right, r_left, r_right, last_side)`` after a step to z with residual
    r = h(z) - b: z replaces the end whose residual has the sign of r."""
    below = r < 0
    # Illinois: an end kept twice in a row has its residual halved, so it cannot stall
    r_right = torch.where(below & (last_side == -1), 0.5 * r_right, r_right)
    r_left = torch.where(~below & (last_side == 1), 0.5 * r_left, r_left)
    z_left, r_left = torch.where(below, z, z_left), torch.where(below, r, r_left)
    z_right, r_right = torch.where(below, z_right, z), torch.where(below, r_right, r)
    last_side = torch.where(below, -1, 1).to(torch.int8)
    return z_left, z_right, r_left, r_right, last_side


def scalar_resolvent_solve(g: Callable[[Tensor], Tensor], b: Tensor, sign: float, options: SolverOptions,
                           first_evaluation: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, SolverInfo]:
    """Solve :math:`z + s\\,g(z) = b` for a batch of one-element samples (no autograd).

    Args:
        g: the network, applied to tensors shaped like ``b``.
        b: right-hand sides, shape (batch, 1, ...) with one element per sample.
        sign: s, +1 or -1.
        options: ``table_points``, tolerances, ``max_iterations`` (per sample, after the table)
            and ``on_failure`` are used.
        first_evaluation: called instead of g at the first false-position points (every sample,
            shaped like ``b``); the caller may record a graph there (:func:`monoflow.implicit.solve_resolvent`
            does, so that samples converged after one iteration need no evaluation at the solution).

    Returns:
        ``(z, info)`` as :func:`monoflow.solvers.fixed_point_solve` returns them: z is
        :math:`f(z_k) = b - s\\,g(z_k)` at the last iterate; ``info.evaluations`` counts the
        calls of g, the table's included.
    """
    if b.dim() < 1 or b.shape[0] == 0 or b[0].numel() != 1:
        raise ValueError(
            "SolverOptions(method='scalar') needs one element per sample, "
            f"got right-hand sides of shape {tuple(b.shape)}"
        )
    sample_shape = b.shape[1:]
    atol, rtol = resolve_tolerances(options, b.dtype)
    rhs = b.reshape(-1)
    batch = rhs.shape[0]

    def signed_g(z: Tensor, network: Callable[[Tensor], Tensor] = g) -> Tensor:
        return sign * network(z.reshape((-1,) + sample_shape)).reshape(-1)

    def h(z: Tensor) -> Tensor:
        return z + signed_g(z)

    points = max(2, min(options.table_points, batch))
    grid, table, evaluations = _bracketing_table(h, rhs, points)
    z_left, z_right, r_left, r_right = _grid_brackets(grid, table, rhs)

    solution = torch.empty_like(rhs)
    residual = torch.full_like(rhs, float("inf"))
    iterations = torch.zeros(batch, dtype=torch.long, device=rhs.device)
    converged = torch.zeros(batch, dtype=torch.bool, device=rhs.device)
    active = torch.arange(batch, device=rhs.device)
    # which end the last step replaced: -1 left, +1 right, 0 none yet (for the Illinois rule)
    last_side = torch.zeros(batch, dtype=torch.int8, device=rhs.device)
    for iteration in range(options.max_iterations):
        z = _false_position(z_left, z_right, r_left, r_right)
        f_z = rhs - signed_g(z, first_evaluation if iteration == 0 and first_evaluation is not None else g)
        evaluations += 1
        r = z - f_z  # h(z) - b
        done = r.abs() <= atol + rtol * f_z.abs()
        iterations[active] += 1
        solution[active], residual[active], converged[active] = f_z, r.abs(), done
        if bool(done.all()):
            break
        z_left, z_right, r_left, r_right, last_side = _illinois_update(z, r, z_left, z_right, r_left, r_right,
                                                                       last_side)
        keep = ~done
        active, rhs = active[keep], rhs[keep]
        z_left, z_right, r_left, r_right, last_side = (
            z_left[keep], z_right[keep], r_left[keep], r_right[keep], last_side[keep])

    info = SolverInfo(iterations=iterations, residual=residual, converged=converged, evaluations=evaluations)
    solution = solution.reshape(b.shape)
    report_failure(info, options, atol, rtol, solution)
    return solution, info

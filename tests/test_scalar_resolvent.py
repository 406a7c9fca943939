"""The scalar resolvent solve (table, interpolation, bracketing) against the fixed-point solve,
the equation itself, its gradients, and its errors."""
import math

import pytest
import torch

from monoflow.blocks import ImplicitBlock, MonotoneBlock
from monoflow.implicit import solve_resolvent
from monoflow.lipschitz import dense_mlp, set_learnable_concat
from monoflow.models import regression_flow
from monoflow.scalar_resolvent import scalar_resolvent_solve
from monoflow.solvers import SolverError, SolverOptions, fixed_point_solve

SCALAR = SolverOptions(method="scalar")


def _g(activation="crelu", coeff=0.99, depth=3, growth=16):
    g = dense_mlp(1, depth, growth, activation, coeff=coeff, lip_coeff=0.99)
    set_learnable_concat(g, True)
    with torch.no_grad():  # a g far from linear: large weights in every direction
        for layer in g.layers:
            linear = getattr(layer, "linear", layer)
            linear.weight.mul_(5.0)
            linear.bias.normal_()
    return g


def _fixed_point(g, b, sign):
    def step(z, index):
        return (b if index is None else b[index]) - sign * g(z)
    return fixed_point_solve(step, b, SolverOptions())


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("activation", ["crelu", "cpila"])
def test_solves_the_equation_and_agrees_with_the_fixed_point_iteration(sign, activation, float64):
    g = _g(activation)
    b = 2.0 * torch.randn(400, 1)
    with torch.no_grad():
        z, info = scalar_resolvent_solve(g, b, sign, SCALAR)
        reference, reference_info = _fixed_point(g, b, sign)
        residual = (z + sign * g(z) - b).abs()
    assert info.all_converged and reference_info.all_converged
    assert info.iterations.shape == (400,) and info.residual.shape == (400,)
    atol, rtol = 1e-12, 1e-10  # float64 defaults
    assert float(residual.max()) <= 1.1 * (atol + rtol * float(z.abs().max())) + 1e-12
    assert torch.allclose(z, reference, atol=1e-8)
    assert info.evaluations < reference_info.evaluations


def test_a_piecewise_linear_g_is_mostly_solved_by_the_first_interpolation(float64):
    # on an interval of the table where the ReLU network is linear, interpolation is exact
    g = _g("crelu")
    b = torch.randn(2000, 1)
    with torch.no_grad():
        _, info = scalar_resolvent_solve(g, b, 1.0, SCALAR)
    assert info.all_converged
    assert float(info.iterations.double().mean()) < 1.5


def test_far_right_hand_sides_widen_the_table_and_small_batches_work(float64):
    g = _g("cpila")
    for b in (1e4 * torch.randn(50, 1), torch.randn(1, 1), torch.randn(3, 1)):
        with torch.no_grad():
            z, info = scalar_resolvent_solve(g, b, 1.0, SCALAR)
            residual = (z + g(z) - b).abs()
        assert z.shape == b.shape and info.all_converged
        assert float(residual.max()) < 1e-9 * max(1.0, float(b.abs().max()))


def test_failure_policies(float64):
    g = _g("cpila")
    b = torch.randn(64, 1)
    hard = SolverOptions(method="scalar", table_points=2, max_iterations=1)
    with torch.no_grad():
        with pytest.raises(SolverError, match="did not converge"):
            scalar_resolvent_solve(g, b, 1.0, hard.with_(on_failure="raise"))
        z, info = scalar_resolvent_solve(g, b, 1.0, hard.with_(on_failure="nan"))
    assert not info.all_converged
    assert torch.isnan(z[~info.converged]).all() and torch.isfinite(z[info.converged]).all()


def test_errors_name_the_problem():
    g = _g()
    with pytest.raises(ValueError, match="one element per sample"):
        scalar_resolvent_solve(dense_mlp(2, 2, 4, "crelu"), torch.randn(5, 2), 1.0, SCALAR)
    with pytest.raises(ValueError, match="only for resolvent solves"):
        fixed_point_solve(lambda z, index: z, torch.randn(4, 1), SCALAR)
    with pytest.raises(ValueError, match="adjoint solve is linear"):
        solve_resolvent(g, torch.randn(4, 1), 1.0, SCALAR, SCALAR)
    with pytest.raises(ValueError, match="table_points"):
        SolverOptions(method="scalar", table_points=1)
    with pytest.raises(ValueError, match="increasing"):  # z - 2z = -z decreases: nothing brackets
        scalar_resolvent_solve(lambda z: 2.0 * z, torch.randn(8, 1), -1.0, SCALAR)


@pytest.mark.parametrize("kind", ["monotone", "implicit"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_gradients_equal_those_of_the_fixed_point_solve(kind, direction, float64):
    # same model, scalar solves and a direct adjoint with the Jacobian from one vector-Jacobian
    # product, against Anderson solves with the iterative adjoint
    g1, g2 = _g(), _g("cpila")
    x = torch.randn(32, 1)
    grads = []
    for solver, adjoint in ((SolverOptions(), SolverOptions()), (SCALAR, SolverOptions(method="direct"))):
        if kind == "monotone":
            block = MonotoneBlock(g1, logdet=None, solver=solver, adjoint=adjoint)
        else:
            block = ImplicitBlock(g1, g2, logdet=None, solver=solver, adjoint=adjoint)
        for p in block.parameters():
            p.grad = None
        xx = x.clone().requires_grad_()
        out, _ = block(xx, with_logdet=False) if direction == "forward" else block.inverse(xx, with_logdet=False)
        (out - torch.sin(3 * x)).square().sum().backward()
        grads.append(torch.cat([xx.grad.flatten()] + [p.grad.flatten() for p in block.parameters()]))
        assert all(info.all_converged for info in block.last_solves.values())
    assert torch.allclose(grads[0], grads[1], atol=1e-8, rtol=1e-6)


def test_gradcheck_through_scalar_solves(float64):
    block = MonotoneBlock(_g("cpila"), logdet=None, solver=SCALAR, adjoint=SolverOptions(method="direct"))
    x = torch.randn(6, 1, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: block(z, with_logdet=False)[0], (x,), atol=1e-6)
    assert torch.autograd.gradcheck(lambda z: block.inverse(z, with_logdet=False)[0], (x,), atol=1e-6)


def test_regression_flows_use_scalar_solves():
    flow = regression_flow("monotone_actnorm", depth=2, growth=8)
    x = torch.linspace(-2, 2, 300)[:, None]
    y, _ = flow(x, with_logdet=False)
    back, _ = flow.inverse(y.detach(), with_logdet=False)
    solves = [block.last_solves for block in flow.blocks if isinstance(block, MonotoneBlock)]
    assert all(block.solver.method == "scalar" for block in flow.blocks if isinstance(block, MonotoneBlock))
    assert all(s["forward"].all_converged and s["inverse"].all_converged for s in solves)
    assert float((back - x).abs().max().detach()) < 1e-4
    assert math.isfinite(float(y.detach().sum()))

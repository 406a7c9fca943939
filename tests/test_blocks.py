"""Blocks against exact oracles: round trips, slogdet of autograd Jacobians, monotone bounds,
implicit gradients (gradcheck and finite differences), the paper's identities."""
import math

import pytest
import torch
from torch import nn

from monoflow.blocks import ActNorm, ImplicitBlock, MonotoneBlock, ResidualBlock, solver_stats
from monoflow.lipschitz import dense_mlp, set_learnable_concat
from monoflow.logdet import ExactLogDet

SQRT2 = math.sqrt(2.0)


def _g(dim, activation="cpila", coeff=0.9, depth=2, growth=8):
    g = dense_mlp(dim, depth, growth, activation, coeff=coeff, lip_coeff=0.98)
    set_learnable_concat(g, True)
    with torch.no_grad():  # move the concatenation scales off their symmetric start
        for name, p in g.named_parameters():
            if name.endswith(("K1", "K2", "k1", "k2")):
                p.add_(torch.randn(()) * 0.5)
    return g


def _make(kind, dim):
    if kind == "monotone":
        return MonotoneBlock(_g(dim))
    if kind == "residual":
        return ResidualBlock(_g(dim, "clipswish"))
    if kind == "implicit":
        return ImplicitBlock(_g(dim), _g(dim, "clipswish"))
    if kind == "actnorm":
        block = ActNorm(dim)
        block(torch.randn(7, dim) * 3 + 1)
        return block
    raise AssertionError(kind)


def _autograd_logdet(fn, x):
    jac = torch.stack([torch.autograd.functional.jacobian(lambda z: fn(z[None])[0], xi) for xi in x])
    return torch.linalg.slogdet(jac)[1]


KINDS = ["monotone", "residual", "implicit", "actnorm"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", [1, 2, 3, 5])
def test_round_trip_and_logdet_against_slogdet(kind, dim, float64):
    block = _make(kind, dim)
    x = torch.randn(6, dim) * 1.5
    y, logdet = block(x)
    x_back, inverse_logdet = block.inverse(y)
    assert torch.allclose(x_back, x, atol=1e-8)
    assert logdet.shape == (6,)
    assert torch.allclose(logdet, _autograd_logdet(lambda z: block(z)[0], x), atol=1e-8)
    assert torch.allclose(inverse_logdet, _autograd_logdet(lambda z: block.inverse(z)[0], y), atol=1e-8)
    assert torch.allclose(logdet + inverse_logdet, torch.zeros(6), atol=1e-9)
    # the inverse direction as a round trip too
    z = torch.randn(6, dim)
    assert torch.allclose(block(block.inverse(z)[0])[0], z, atol=1e-8)


@pytest.mark.parametrize("kind", ["monotone", "residual", "implicit"])
def test_maps_change_volume(kind, float64):
    block = _make(kind, 3)
    _, logdet = block(torch.randn(64, 3) * 2)
    assert logdet.abs().max() > 1e-2  # the oracle comparisons above are not trivially 0 == 0


def test_monotone_identities(float64):
    block = _make("monotone", 3)
    x = torch.randn(10, 3)
    y, _ = block(x)
    w = (x + y) / SQRT2
    assert torch.allclose(block.g(w), (x - y) / SQRT2, atol=1e-9)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_monotone_bounds_on_random_pairs(direction, float64):
    block = _make("monotone", 4)
    L = block.g.lipschitz_bound()
    assert L < 1
    m, lip = (1 - L) / (1 + L), (1 + L) / (1 - L)
    F = (lambda z: block(z)[0]) if direction == "forward" else (lambda z: block.inverse(z)[0])
    a, b = torch.randn(500, 4) * 2, torch.randn(500, 4) * 2
    b[:250] = a[:250] + 1e-3 * torch.randn(250, 4)  # near pairs probe the local slope
    dF, dx = F(a) - F(b), a - b
    assert ((dF * dx).sum(1) >= m * (dx * dx).sum(1) - 1e-10).all()
    assert (dF.norm(dim=1) <= lip * dx.norm(dim=1) + 1e-10).all()


def test_one_dimensional_slope_range(float64):
    block = _make("monotone", 1)
    L = block.g.lipschitz_bound()
    x = torch.linspace(-4, 4, 401)[:, None].requires_grad_()
    y, _ = block(x)
    (slope,) = torch.autograd.grad(y.sum(), x)
    assert slope.min() >= (1 - L) / (1 + L) - 1e-10 and slope.max() <= (1 + L) / (1 - L) + 1e-10


class _Scaled(nn.Module):
    """g(w) = a w: a parameter-free contraction for |a| < 1."""

    def __init__(self, a):
        super().__init__()
        self.a = a
        self.lipschitz_constant = abs(a)  # declared: the blocks refuse a g they cannot bound

    def forward(self, w):
        return self.a * w


def test_expressivity_witness_is_monotone_block(float64):
    # F = ((1+L)/(1-L)) Id: a monotone block with g = -L Id, not reachable by a residual block
    L = 0.8
    block = MonotoneBlock(_Scaled(-L))
    x = torch.randn(5, 2)
    y, logdet = block(x)
    c = (1 + L) / (1 - L)
    assert torch.allclose(y, c * x)
    assert torch.allclose(logdet, torch.full((5,), 2 * math.log(c)))
    # a residual block with Lip(g) <= L has slopes in [1-L, 1+L] < c
    assert 1 + L < c


@pytest.mark.parametrize("kind", ["monotone", "residual", "implicit"])
def test_gradcheck_inputs(kind, float64):
    block = _make(kind, 2)
    x = torch.randn(3, 2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: block(z), (x,), atol=1e-6)
    assert torch.autograd.gradcheck(lambda z: block.inverse(z), (x,), atol=1e-6)


@pytest.mark.parametrize("kind", ["monotone", "residual", "implicit"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_parameter_gradients_against_finite_differences(kind, direction, float64):
    block = _make(kind, 2)
    x = torch.randn(8, 2)
    params = [p for p in block.parameters() if p.requires_grad]
    directions = [torch.randn_like(p) for p in params]
    target = torch.randn(8, 2)

    def loss():
        out, logdet = block(x) if direction == "forward" else block.inverse(x)
        return ((out - target) ** 2).sum() + logdet.sum()

    block.zero_grad()
    loss().backward()
    analytic = sum((p.grad * d).sum() for p, d in zip(params, directions))
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(params, directions):
            p.add_(eps * d)
    plus = loss().item()
    with torch.no_grad():
        for p, d in zip(params, directions):
            p.sub_(2 * eps * d)
    minus = loss().item()
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic.item() - numeric) < 1e-6 * max(1.0, abs(numeric))


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_gets_a_gradient(kind):
    block = _make(kind, 2)
    y, logdet = block(torch.randn(16, 2))
    (y.square().sum() + logdet.sum()).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_solver_diagnostics_are_recorded():
    block = _make("monotone", 2)
    y, logdet = block(torch.randn(32, 2))
    (y.sum() + logdet.sum()).backward()
    block.inverse(y.detach())
    stats = solver_stats(block)
    for kind in ("forward", "inverse", "adjoint"):
        assert stats[f"{kind}_converged_fraction"] == 1.0
        assert 1 <= stats[f"{kind}_iterations_max"] <= 30


def test_bad_inputs_give_clear_errors():
    block = _make("monotone", 2)
    with pytest.raises(ValueError, match="non-finite"):
        block(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(TypeError, match="floating-point"):
        block(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        block(torch.ones(3))
    with pytest.raises(ValueError, match="unconstrained Linear"):
        MonotoneBlock(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    with pytest.raises(ValueError, match="unknown log-det estimator"):
        MonotoneBlock(_g(2), logdet="magic")
    with pytest.raises(ValueError, match="exact"):
        MonotoneBlock(_g(2), logdet=ExactLogDet(max_dim=1))(torch.randn(2, 2))
    with pytest.raises(ValueError, match="ActNorm"):
        ActNorm(3)(torch.randn(4, 2))
    with pytest.raises(RuntimeError, match="before initialisation"):
        ActNorm(2).inverse(torch.randn(4, 2))


def test_actnorm_initialises_to_zero_mean_unit_variance():
    block = ActNorm(3)
    x = torch.randn(256, 3, 4, 4) * torch.tensor([1.0, 5.0, 0.1])[None, :, None, None] + 2.0
    y, logdet = block(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    assert torch.allclose(logdet, torch.full((256,), 16 * float(block.log_scale.detach().sum())))


@pytest.mark.parametrize("kind", ["monotone", "residual"])
def test_direct_adjoint_matches_iterative_adjoint(kind, float64):
    from monoflow.solvers import SolverOptions

    g = _g(3)
    x = torch.randn(16, 3)
    grads = []
    for adjoint in (SolverOptions(), SolverOptions(method="direct")):
        Block = MonotoneBlock if kind == "monotone" else ResidualBlock
        block = Block(g, adjoint=adjoint)
        g.zero_grad()
        xx = x.clone().requires_grad_()
        out, logdet = block(xx) if kind == "monotone" else block.inverse(xx)
        (out.square().sum() + logdet.sum()).backward()
        grads.append(torch.cat([xx.grad.flatten()] + [p.grad.flatten() for p in g.parameters()]))
        assert block.last_solves["adjoint"].all_converged
    assert torch.allclose(grads[0], grads[1], atol=1e-9)


@pytest.mark.parametrize("kind", ["monotone", "implicit"])
def test_direct_adjoint_without_logdet_takes_one_jacobian_pass(kind):
    # regression flows have no log-det: the direct adjoint then takes the Jacobian from the graph
    # evaluation at the solution; gradients must equal the iterative adjoint's (float64 oracle)
    from monoflow.solvers import SolverOptions

    torch.manual_seed(2)
    g1, g2 = _g(2).double(), _g(2).double()
    x = torch.randn(12, 2, dtype=torch.float64)
    grads, calls = [], []
    for adjoint in (SolverOptions(), SolverOptions(method="direct")):
        if kind == "monotone":
            block = MonotoneBlock(g1, logdet=None, adjoint=adjoint)
        else:
            block = ImplicitBlock(g1, g2, logdet=None, adjoint=adjoint)
        count = [0]
        methods = ("jacobian", "value_and_detached_jacobian")  # the second: the Jacobian in one pass
        for method in methods:
            def counted(w, original=getattr(g1, method), count=count):
                count[0] += 1
                return original(w)
            setattr(g1, method, counted)
        try:
            for p in block.parameters():
                p.grad = None
            xx = x.clone().requires_grad_()
            out, _ = block(xx) if kind == "monotone" else block.inverse(xx)
            in_forward = count[0]
            out.square().sum().backward()
        finally:
            for method in methods:
                delattr(g1, method)
        grads.append(torch.cat([xx.grad.flatten()] + [p.grad.flatten() for p in block.parameters() if p.grad is not None]))
        calls.append((in_forward, count[0]))
    assert torch.allclose(grads[0], grads[1], atol=1e-9)
    assert calls == [(0, 0), (1, 1)]  # the direct adjoint's Jacobian comes from the forward pass


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_newton_start_reaches_the_same_solution_in_fewer_iterations(sign, float64):
    """SolverOptions(start="newton") starts the resolvent solve Newton steps from b: the same
    stopping test, so the same solution within tolerance and the same implicit gradients, with
    fewer fixed-point evaluations on a strongly nonlinear g (the start's Jacobian passes counted)."""
    from monoflow.implicit import solve_resolvent
    from monoflow.solvers import SolverOptions

    torch.manual_seed(11)
    g = dense_mlp(2, 3, 16, "cpila", coeff=0.97, lip_coeff=0.98).double()
    with torch.no_grad():  # a g far from the identity's neighbourhood: several iterations needed
        for layer in g.layers[:-1]:
            layer.linear.weight.mul_(4.0)
    update_infos = {}
    b = (3.0 * torch.randn(64, 2, dtype=torch.float64)).requires_grad_(True)
    solutions, gradients = {}, {}
    for start in ("rhs", "newton"):
        record = lambda name, info, start=start: update_infos.__setitem__((start, name), info)
        z = solve_resolvent(g, b, sign, SolverOptions(start=start), SolverOptions(method="direct"), record=record)
        solutions[start] = z.detach()
        gradients[start] = torch.autograd.grad((z ** 2).sum(), [b, *g.parameters()], allow_unused=True)
    residual = solutions["newton"] + sign * g(solutions["newton"]).detach() - b.detach()
    assert residual.norm(dim=1).max() < 1e-9
    torch.testing.assert_close(solutions["newton"], solutions["rhs"], rtol=1e-8, atol=1e-9)
    for mine, theirs in zip(gradients["newton"], gradients["rhs"]):
        if theirs is not None:
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-8)
    newton, plain = update_infos[("newton", "forward")], update_infos[("rhs", "forward")]
    assert newton.all_converged and plain.all_converged
    assert newton.evaluations < plain.evaluations
    assert newton.iterations.float().mean() < plain.iterations.float().mean()


def test_newton_start_needs_a_jacobian_and_flat_inputs():
    from monoflow.implicit import solve_resolvent
    from monoflow.solvers import SolverOptions

    with pytest.raises(ValueError, match="unknown solver start"):
        SolverOptions(start="zero")
    with pytest.raises(ValueError, match="newton_steps must be >= 1"):
        SolverOptions(start="newton", newton_steps=0)
    plain = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="start 'newton' needs flat inputs"):
        solve_resolvent(plain, torch.randn(4, 2), 1.0, SolverOptions(start="newton"))


def test_toy_flows_start_their_solves_with_newton_steps_in_two_dimensions():
    from monoflow.models import toy_flow

    assert all(block.solver.start == "newton" for block in toy_flow("monotone", nblocks=2, depth=1, growth=4).blocks)
    wide = toy_flow("monotone", dim=5, nblocks=1, depth=1, growth=4)
    assert wide.blocks[0].solver is None or wide.blocks[0].solver.start == "rhs"

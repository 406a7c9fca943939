"""CompiledFlowLoss: the eager flow's loss and gradients, from compiled graphs of groups of blocks.

Each compile takes tens of seconds on two cores, so the compiled losses are module fixtures and
the training test uses the same architecture (the inductor cache then shortens its compile).
"""
import copy
import math

import pytest
import torch

from monoflow.cli import main
from monoflow.compiled import DEFAULT_NEWTON_STEPS, CompiledFlowLoss, CompiledUpdate, newton_resolvent
from monoflow.experiments import run_toy, toy_config
from monoflow.experiments.train import make_optimizer
from monoflow.lipschitz import SpectralNormLinear, dense_mlp, set_learnable_concat, update_lipschitz
from monoflow.blocks import ResidualBlock
from monoflow.flows import Flow
from monoflow.models import toy_flow

ARCHITECTURE = dict(nblocks=4, depth=1, growth=8)  # two groups of DEFAULT_BLOCKS_PER_GRAPH blocks
SQRT2 = math.sqrt(2.0)


def _spread_weights(flow):
    """Larger weights than at initialisation, so g is far from zero and the solves do real work."""
    with torch.no_grad():
        for name, parameter in flow.named_parameters():
            if name.endswith("weight"):
                parameter.mul_(3.0)
    return flow


def _flow_and_loss(kind, seed):
    torch.manual_seed(seed)
    flow = _spread_weights(toy_flow(kind, **ARCHITECTURE))
    set_learnable_concat(flow, True)
    return flow, CompiledFlowLoss(flow)


@pytest.fixture(scope="module")
def monotone():
    return _flow_and_loss("monotone", 0)


@pytest.fixture(scope="module")
def idensenet():
    return _flow_and_loss("idensenet", 1)


@pytest.fixture(scope="module")
def resflow():
    return _flow_and_loss("resflow", 2)


def _check_against_eager(flow, loss_fn, x):
    parameters = [p for _, p in flow.named_parameters()]
    eager = -flow.log_prob(x).mean()
    eager_grads = torch.autograd.grad(eager, parameters)
    loss = loss_fn(x)
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    assert loss_fn.fallbacks == 0
    assert abs(loss.item() - eager.item()) <= 1e-5 * abs(eager.item())
    for (name, _), mine, theirs in zip(flow.named_parameters(), grads, eager_grads):
        assert mine is not None, f"{name} receives no gradient"
        assert float(theirs.abs().max()) > 0, f"{name}: eager gradient is zero"
        assert torch.allclose(mine, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max())), name


def test_monotone_loss_and_every_gradient_equal_the_eager_flow(monotone):
    flow, loss_fn = monotone
    x = 2 * torch.randn(256, 2)
    _check_against_eager(flow, loss_fn, x)
    # the map changes volume: the log-det is not zero
    _, logdet = flow(x)
    assert float(logdet.abs().mean()) > 0.1


def test_idensenet_loss_and_every_gradient_equal_the_eager_flow(idensenet):
    flow, loss_fn = idensenet
    _check_against_eager(flow, loss_fn, 2 * torch.randn(256, 2))


def test_resflow_loss_and_every_gradient_equal_the_eager_flow(resflow):
    flow, loss_fn = resflow
    _check_against_eager(flow, loss_fn, 2 * torch.randn(256, 2))


def test_groups_of_blocks_reuse_one_compiled_graph_and_match_the_whole_flow_graph():
    """Every group of blocks runs the same compiled graph (the modules are traced by structure, their
    parameters are inputs): a new flow of a compiled architecture compiles no new graph, and its loss
    and gradients equal those of one graph for the whole flow."""
    from torch._dynamo.utils import counters

    torch.manual_seed(6)
    flow = _spread_weights(toy_flow("monotone", **ARCHITECTURE))
    set_learnable_concat(flow, True)
    grouped, whole = CompiledFlowLoss(flow), CompiledFlowLoss(flow, blocks_per_graph=None)
    assert [len(chunk) for chunk in grouped._chunks] == [2, 2] and len(whole._chunks) == 1
    x = 2 * torch.randn(256, 2)
    parameters = list(flow.parameters())
    graphs = counters["stats"]["unique_graphs"]
    grouped_loss = grouped(x)
    assert counters["stats"]["unique_graphs"] - graphs <= 1  # the two groups share one graph
    grouped_grads = torch.autograd.grad(grouped_loss, parameters)
    whole_loss = whole(x)
    whole_grads = torch.autograd.grad(whole_loss, parameters)
    assert grouped.fallbacks == whole.fallbacks == 0
    torch.testing.assert_close(grouped_loss, whole_loss, rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(grouped_grads, whole_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))
    with pytest.raises(ValueError, match="blocks_per_graph"):
        CompiledFlowLoss(flow, blocks_per_graph=0)


def test_newton_solves_are_recorded_and_converged(monotone):
    flow, loss_fn = monotone
    loss_fn(2 * torch.randn(128, 2))
    for block in flow.blocks:
        summary = block.last_solves["forward"].summary()
        assert summary["iterations_mean"] == loss_fn.newton_steps + 1
        assert summary["converged_fraction"] == 1.0
        assert summary["residual_max"] < 1e-4
        assert "adjoint" not in block.last_solves


def test_the_recorded_residual_is_that_of_the_solution_the_loss_uses():
    """The convergence check reads the residual at the returned solution (the pass that also gives
    the log-det), not at the point before the differentiable step. With one Newton step before it,
    the two differ by orders of magnitude."""
    torch.manual_seed(5)
    # two blocks: deeper, the eager recomputation's rounding (up to about 2e-6 in the second block, whose
    # input is the first's eager output) reaches these residuals
    flow = _spread_weights(toy_flow("monotone", **{**ARCHITECTURE, "nblocks": 2}))
    loss_fn = CompiledFlowLoss(flow, newton_steps=1)
    loss_fn.atol, loss_fn.rtol = 1.0, 0.0  # record without falling back to the eager loss
    x = 2 * torch.randn(128, 2)
    loss_fn(x)
    with torch.no_grad():
        for block in flow.blocks:
            b = SQRT2 * x
            w, value, _ = newton_resolvent(block.g, b, 1)
            at_solution = (w + value - b).norm(dim=1)
            w_before, value_before, _ = newton_resolvent(block.g, b, 0)  # the point the last step starts from
            before_step = (w_before + value_before - b).norm(dim=1)
            assert float(before_step.max()) > 100 * float(at_solution.max())
            assert torch.allclose(block.last_solves["forward"].residual, at_solution, rtol=1e-2, atol=3e-6)
            x = SQRT2 * w - x


def test_eager_passes_between_compiled_calls_do_not_recompile():
    """A training run tests the flow eagerly between compiled iterations; the compiled graph must not
    depend on state that those passes leave behind (it did: the per-pass parameter cache), or the
    first test would cost a whole second compile."""
    from monoflow import lipschitz

    torch.manual_seed(4)
    flow = _spread_weights(toy_flow("monotone", **ARCHITECTURE))
    set_learnable_concat(flow, True)
    loss_fn = CompiledFlowLoss(flow)
    if hasattr(lipschitz._PASS, "cache"):  # as in a fresh process: no eager pass has run yet
        del lipschitz._PASS.cache
    x = 2 * torch.randn(256, 2)
    loss_fn(x).backward()
    with torch.no_grad():
        z, _ = flow(x)
        flow.inverse(z)
    flow.log_prob(x).mean().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss_fn(x).backward()
    assert loss_fn.compiles == 1 and loss_fn.fallbacks == 0


def test_newton_resolvent_solves_and_has_the_implicit_gradient(float64):
    torch.manual_seed(3)
    g = dense_mlp(2, 2, 8, "cpila", coeff=0.9, lip_coeff=0.98)
    with torch.no_grad():
        for layer in g.layers[:-1]:
            layer.linear.weight.mul_(3.0)
    b = torch.randn(5, 2, requires_grad=True)
    w, value, jac_w = newton_resolvent(g, b, steps=6)
    assert float((w + g(w) - b).abs().max()) < 1e-12
    # g and its Jacobian at the returned solution, as an independent pass computes them
    reference_value, reference_jac = g.jacobian(w.detach())
    assert torch.allclose(value, reference_value, atol=1e-12) and torch.allclose(jac_w, reference_jac, atol=1e-12)
    # dw/db = (I + J)^-1 at the solution, from finite differences of the solve
    expected = torch.linalg.inv(torch.eye(2) + reference_jac)
    (row,) = torch.autograd.grad(w[:, 0].sum(), b)
    assert torch.allclose(row, expected[:, 0, :], atol=1e-10)
    eps = 1e-6
    shifted, _, _ = newton_resolvent(g, (b + eps * torch.tensor([1.0, 0.0])).detach(), steps=6)
    assert torch.allclose((shifted - w.detach()) / eps, expected[:, :, 0], atol=1e-5)


def test_a_missed_tolerance_falls_back_to_the_eager_loss(monotone):
    flow, loss_fn = monotone
    x = 2 * torch.randn(64, 2)
    before = loss_fn.fallbacks
    loss_fn.atol, loss_fn.rtol = 0.0, 0.0
    try:
        loss = loss_fn(x)
    finally:
        loss_fn.atol, loss_fn.rtol = None, None
    assert loss_fn.fallbacks == before + 1
    assert torch.equal(loss, -flow.log_prob(x).mean())


def test_compiled_update_equals_adam_and_power_iterations():
    torch.manual_seed(4)
    config = toy_config("quick")
    eager_model = _spread_weights(toy_flow("idensenet", **ARCHITECTURE))
    compiled_model = copy.deepcopy(eager_model)
    initial = copy.deepcopy(eager_model.state_dict())
    optimizers = [make_optimizer(m, config) for m in (eager_model, compiled_model)]
    update = CompiledUpdate(compiled_model, optimizers[1], power_iterations=5)
    for step in range(3):
        x = 2 * torch.randn(64, 2)
        for model, optimizer in zip((eager_model, compiled_model), optimizers):
            optimizer.zero_grad()
            (-model.log_prob(x).mean()).backward()
        optimizers[0].step()
        update_lipschitz(eager_model, n_iterations=5)
        update()
    eager_state, compiled_state = eager_model.state_dict(), compiled_model.state_dict()
    for name, value in eager_state.items():
        assert torch.allclose(compiled_state[name], value, rtol=1e-5, atol=1e-6), name
    moved = [name for name, value in compiled_state.items() if not torch.equal(value, initial[name])]
    assert any(name.endswith("weight") for name in moved) and any(name.endswith(".u") for name in moved)
    with pytest.raises(ValueError, match="power_iterations"):
        CompiledUpdate(compiled_model, optimizers[1], power_iterations=-1)


def test_unsupported_flows_and_inputs_are_named():
    with pytest.raises(ValueError, match="dense_mlp or lipswish_mlp"):
        CompiledFlowLoss(Flow([ResidualBlock(torch.nn.Sequential(SpectralNormLinear(2, 2)))], event_shape=(2,)))
    with pytest.raises(ValueError, match="logdet='exact'"):
        CompiledFlowLoss(toy_flow("monotone", nblocks=1, depth=1, growth=4, logdet="power_series"))
    with pytest.raises(ValueError, match="needs a monoflow Flow"):
        CompiledFlowLoss(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="newton_steps"):
        CompiledFlowLoss(toy_flow("monotone", nblocks=1, depth=1, growth=4), newton_steps=-1)
    loss_fn = CompiledFlowLoss(toy_flow("monotone", nblocks=1, depth=1, growth=4))
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        loss_fn(torch.randn(4, 3))


def test_a_failed_compilation_says_what_to_do():
    from torch._dynamo.exc import BackendCompilerFailed

    loss_fn = CompiledFlowLoss(toy_flow("monotone", nblocks=1, depth=1, growth=4))

    def no_compiler(x):
        inner = RuntimeError("Compiler: cc is not found")
        try:
            error = BackendCompilerFailed(None, inner, None)
        except TypeError:  # torch before 2.6 takes no traceback argument
            error = BackendCompilerFailed(None, inner)
        raise error

    loss_fn._loss = no_compiler
    with pytest.raises(RuntimeError, match="needs a working C\\+\\+ compiler.*without --compile"):
        loss_fn(torch.randn(4, 2))


def test_cli_rejects_compile_with_together(tmp_path, capsys):
    code = main(["table1", "--compile", "--together", "--datasets", "moons", "--output", str(tmp_path)])
    assert code != 0
    assert "--compile and --together" in capsys.readouterr().err


def test_a_compiled_run_trains_like_an_eager_one(tmp_path):
    tiny = dict(ARCHITECTURE, batch_size=64, iterations=6, test_every=3, test_samples=256, report_last=2,
                roundtrip_points=32, figure_grid=16, figure_samples=128, learnable_concat_from=3)
    config = toy_config("quick", model="monotone", dataset="moons", **tiny)
    compiled = run_toy(config, tmp_path / "compiled", progress=False, compile=True)
    eager = run_toy(config, tmp_path / "eager", progress=False)
    assert compiled["status"] == eager["status"] == "finished"
    assert compiled["sessions"][-1]["training_loss"].startswith("compiled")
    assert eager["sessions"][-1]["training_loss"] == "eager"
    assert compiled["compiled_loss"]["batches_last_session"] == 6
    assert compiled["compiled_loss"]["newton_steps"] == DEFAULT_NEWTON_STEPS
    assert compiled["compiled_loss"]["eager_fallbacks_last_session"] == 0
    # compiled at the first batch and again when learnable concatenation switched on
    assert compiled["compiled_loss"]["compiles_last_session"] == 2
    assert 0 < compiled["compiled_loss"]["compile_s_last_session"] < compiled["timing"]["wall_time_s"]
    for mine, theirs in zip(compiled["tests"], eager["tests"]):
        assert math.isclose(mine["train_loss"], theirs["train_loss"], rel_tol=1e-4)
        assert math.isclose(mine["metric"], theirs["metric"], rel_tol=1e-4)
    # stopped and resumed (a new process would compile again): the same run
    stopped = run_toy(config, tmp_path / "resumed", progress=False, compile=True, stop_after=4)
    assert stopped["status"] == "interrupted"
    resumed = run_toy(config, tmp_path / "resumed", progress=False, compile=True)
    assert resumed["compiled_loss"]["compiles_last_session"] == 1  # learnable concatenation was on already
    assert [t["metric"] for t in resumed["tests"]] == pytest.approx([t["metric"] for t in compiled["tests"]], rel=1e-6)
    assert [t["train_loss"] for t in resumed["tests"]] == pytest.approx(
        [t["train_loss"] for t in compiled["tests"]], rel=1e-6)


def test_a_compiled_residual_flow_run_trains_like_an_eager_one(tmp_path):
    tiny = dict(ARCHITECTURE, batch_size=64, iterations=4, test_every=2, test_samples=256, report_last=2,
                roundtrip_points=32, figure_grid=16, figure_samples=128)
    config = toy_config("quick", model="resflow", dataset="moons", **tiny)
    compiled = run_toy(config, tmp_path / "compiled", progress=False, compile=True)
    eager = run_toy(config, tmp_path / "eager", progress=False)
    assert compiled["sessions"][-1]["training_loss"] == "compiled"
    assert compiled["compiled_loss"]["newton_steps"] is None  # residual blocks: no solves in training
    assert compiled["compiled_loss"]["compiles_last_session"] == 1
    for mine, theirs in zip(compiled["tests"], eager["tests"]):
        assert math.isclose(mine["train_loss"], theirs["train_loss"], rel_tol=1e-4)
        assert math.isclose(mine["metric"], theirs["metric"], rel_tol=1e-4)

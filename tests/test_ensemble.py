"""Ensembles: E flows evaluated and trained as one batched model equal the E flows alone."""
import json

import pytest
import torch

from monoflow.blocks import ActNorm, MonotoneBlock
from monoflow.checkpoint import FolderLock
from monoflow.cli import main
from monoflow.ensemble import EnsembleDenseNet, split_members, stack_flows
from monoflow.experiments import run_toy, toy_config, toy_table
from monoflow.experiments.config import ToyEnsembleConfig
from monoflow.experiments.evaluate import evaluate_checkpoint, sample_checkpoint
from monoflow.experiments.results import run_directory
from monoflow.experiments.toy2d_ensemble import ensemble_directory, pending_members, run_toy_ensemble
from monoflow.flows import Flow
from monoflow.lipschitz import dense_mlp, set_learnable_concat, update_lipschitz
from monoflow.models import toy_flow
from monoflow.solvers import SolverOptions, fixed_point_solve

TINY = dict(nblocks=2, depth=1, growth=8, batch_size=32, iterations=6, test_every=3, test_samples=64,
            report_last=2, roundtrip_points=16, figure_grid=12, figure_samples=64, learnable_concat_from=3)


def _members(kind, count=3, seed=0):
    torch.manual_seed(seed)
    flows = [toy_flow(kind, nblocks=3, depth=2, growth=8).double() for _ in range(count)]
    for flow in flows:  # different members, each still a contraction after fresh power iterations
        for parameter in flow.parameters():
            parameter.data.add_(0.3 * torch.randn_like(parameter))
        update_lipschitz(flow, tol=1e-10, max_iterations=500)
        set_learnable_concat(flow, True)
    return flows


@pytest.mark.parametrize("kind", ["monotone", "idensenet", "resflow"])
def test_stacked_flows_equal_the_flows_alone(kind):
    flows = _members(kind)
    ensemble = stack_flows(flows)
    xs = [torch.randn(5, 2, dtype=torch.float64) for _ in flows]
    together = ensemble.log_prob(torch.cat(xs))
    alone = torch.cat([flow.log_prob(x) for flow, x in zip(flows, xs)])
    assert torch.allclose(together, alone, atol=1e-9)
    assert split_members(together, 3).shape == (3, 5)

    # gradients of the summed member losses = each member's own gradient, for every parameter
    grads = torch.autograd.grad(-split_members(together, 3).mean(dim=1).sum(), list(ensemble.parameters()))
    by_parameter = {id(p): g for p, g in zip(ensemble.parameters(), grads)}
    assert len(by_parameter) == sum(len(list(flow.parameters())) for flow in flows)
    for flow, x in zip(flows, xs):
        own = torch.autograd.grad(-flow.log_prob(x).mean(), list(flow.parameters()))
        for parameter, expected in zip(flow.parameters(), own):
            assert torch.allclose(by_parameter[id(parameter)], expected, atol=1e-8)

    z, _ = ensemble(torch.cat(xs))
    back, _ = ensemble.inverse(z)
    assert torch.allclose(back, torch.cat(xs), atol=1e-8)


def test_ensemble_jacobian_matches_each_member_and_autograd():
    torch.manual_seed(1)
    members = [dense_mlp(2, 3, 8, "clipswish", coeff=0.9).double() for _ in range(2)]
    for member in members:
        for parameter in member.parameters():
            parameter.data.add_(0.2 * torch.randn_like(parameter))
        set_learnable_concat(member, True)
    g = EnsembleDenseNet(members)
    w = torch.randn(8, 2, dtype=torch.float64)
    value, jac = g.jacobian(w)
    for index, member in enumerate(members):
        rows = slice(4 * index, 4 * index + 4)
        member_value, member_jac = member.jacobian(w[rows])
        assert torch.allclose(value[rows], member_value, atol=1e-12)
        assert torch.allclose(jac[rows], member_jac, atol=1e-12)
        autograd = torch.func.vmap(torch.func.jacrev(lambda x: member(x.unsqueeze(0)).squeeze(0)))(w[rows])
        assert torch.allclose(jac[rows], autograd, atol=1e-10)


def test_ensemble_chain_jacobian_matches_each_member_and_autograd():
    """Residual Flow's stacked chains propagate Jacobians too (the Newton start of their solves)."""
    from monoflow.ensemble import EnsembleChain
    from monoflow.models.toy import lipswish_mlp

    torch.manual_seed(2)
    members = [lipswish_mlp(2, [6, 6], coeff=0.9).double() for _ in range(2)]
    for member in members:
        for parameter in member.parameters():
            parameter.data.add_(0.2 * torch.randn_like(parameter))
    g = EnsembleChain(members)
    w = torch.randn(8, 2, dtype=torch.float64)
    value, jac = g.jacobian(w)
    torch.testing.assert_close(value, g(w))
    for index, member in enumerate(members):
        rows = slice(4 * index, 4 * index + 4)
        member_value, member_jac = member.jacobian(w[rows])
        torch.testing.assert_close(value[rows], member_value, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(jac[rows], member_jac, rtol=1e-12, atol=1e-12)


def test_stacking_errors_name_the_problem():
    flows = [toy_flow("monotone", nblocks=2, depth=1, growth=4) for _ in range(2)]
    with pytest.raises(ValueError, match="multiple of 2 rows"):
        stack_flows(flows).blocks[0].g(torch.randn(3, 2))
    with pytest.raises(ValueError, match="another architecture"):
        stack_flows([flows[0], toy_flow("monotone", nblocks=2, depth=1, growth=8)])
    with pytest.raises(ValueError, match="different numbers of blocks"):
        stack_flows([flows[0], toy_flow("monotone", nblocks=3, depth=1, growth=4)])
    with pytest.raises(ValueError, match="MonotoneBlock and ResidualBlock"):
        stack_flows([Flow([ActNorm(2)]), Flow([ActNorm(2)])])
    with pytest.raises(ValueError, match="different numbers of blocks|MonotoneBlock"):
        stack_flows([Flow([MonotoneBlock(dense_mlp(2, 1, 4, coeff=0.9))]), Flow([ActNorm(2)])])


def test_whole_batch_solve_evaluates_every_row_and_equals_the_default():
    """Rows converge at different iterations (float32, Anderson): without freezing, every call
    sees all rows, converged rows are held, and solutions and iteration counts are the default's."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 3, generator=generator)
    weight = 0.9 * weight / torch.linalg.matrix_norm(weight, 2)
    target = torch.randn(64, 3, generator=generator) * torch.logspace(-4, 1, 64).unsqueeze(1)
    seen = []

    def f(z, index):
        seen.append(z.shape[0])
        return torch.tanh(z @ weight.T) + (target if index is None else target[index])

    frozen, frozen_info = fixed_point_solve(f, torch.zeros(64, 3))
    assert min(seen) < 64 and len(set(frozen_info.iterations.tolist())) > 2  # rows stop at different times
    seen.clear()
    whole, info = fixed_point_solve(f, torch.zeros(64, 3), SolverOptions(freeze_converged=False))
    assert set(seen) == {64} and info.all_converged
    assert torch.equal(info.iterations, frozen_info.iterations)
    assert torch.allclose(whole, frozen, atol=1e-6, rtol=0)
    assert torch.allclose(whole, torch.tanh(whole @ weight.T) + target, atol=1e-4)


def test_ensemble_config_checks_members():
    a, b = toy_config("quick", dataset="moons"), toy_config("quick", dataset="rings", seed=1)
    config = ToyEnsembleConfig((a, b))
    assert config.iterations == a.iterations and config.model == "monotone" and config.seed == 0
    with pytest.raises(AttributeError):
        config.dataset
    with pytest.raises(ValueError, match="differ only in dataset and seed.*iterations"):
        ToyEnsembleConfig((a, toy_config("quick", dataset="rings", iterations=10)))
    with pytest.raises(ValueError, match="repeat"):
        ToyEnsembleConfig((a, a))
    with pytest.raises(ValueError, match="at least one"):
        ToyEnsembleConfig(())


def test_training_together_equals_training_alone(tmp_path):
    configs = [toy_config("quick", dataset=d, seed=s, **TINY) for d, s in [("moons", 0), ("rings", 1)]]
    record = run_toy_ensemble(configs, tmp_path / "together", progress=False)
    assert record["status"] == "finished" and len(record["members"]) == 2
    for config in configs:
        alone = run_toy(config, tmp_path / "alone", progress=False)
        folder = run_directory(config, tmp_path / "together")
        member = json.loads((folder / "run.json").read_text())
        assert member["ensemble"]["size"] == 2 and (folder / "figure.png").is_file()
        assert set(alone) - {"run_dir"} <= set(member)
        assert member["parameters"] == alone["parameters"]
        together_curve = [t["metric"] for t in member["tests"]]
        alone_curve = [t["metric"] for t in alone["tests"]]
        assert together_curve == pytest.approx(alone_curve, abs=2e-4)
        assert [t["train_loss"] for t in member["tests"]] == pytest.approx([t["train_loss"] for t in alone["tests"]], abs=2e-4)
        assert "ensemble member" in (folder / "train.log").read_text()
        # the member folder is an ordinary run: its checkpoint evaluates like any other
        check = evaluate_checkpoint(folder, samples=64)
        expected = evaluate_checkpoint(run_directory(config, tmp_path / "alone"), samples=64)
        assert check["iteration"] == TINY["iterations"] and check["metric"] == pytest.approx(expected["metric"], abs=2e-4)
    # the ensemble's own checkpoint evaluates every member, as the members' folders do
    ensemble_dir = ensemble_directory(ToyEnsembleConfig(tuple(configs)), tmp_path / "together")
    both = evaluate_checkpoint(ensemble_dir, samples=64)
    assert both["experiment"] == "toy2d_ensemble" and both["iteration"] == TINY["iterations"]
    for config, result in zip(configs, both["members"]):
        alone = evaluate_checkpoint(run_directory(config, tmp_path / "together"), samples=64)
        assert (result["dataset"], result["seed"]) == (config.dataset, config.seed)
        assert result["metric"] == pytest.approx(alone["metric"], abs=1e-6)
    with pytest.raises(ValueError, match="2 runs trained together .*moons seed 0"):
        sample_checkpoint(ensemble_dir, 10)
    # tables count each member's share of the ensemble's wall time
    table = toy_table(tmp_path / "together", "quick").set_index("dataset")
    assert (table["trained_together"] == 2).all()
    shared = json.loads((run_directory(configs[0], tmp_path / "together") / "run.json").read_text())["timing"]["wall_time_s"]
    assert table.loc["moons", "wall_time_s"] == pytest.approx(shared / 2)
    # the two members are different runs (the comparisons above can fail)
    assert record["members"][0]["final_metric"] != record["members"][1]["final_metric"]
    # finished: a second call returns without training; nothing is pending any more
    again = run_toy_ensemble(configs, tmp_path / "together", progress=False)
    assert again["members"] == record["members"]
    assert pending_members(configs, tmp_path / "together") == []


def test_an_ensemble_refuses_a_member_run_in_use(tmp_path):
    """Training together writes every member's own folder, so a member trained alone at the same
    time (another process) stops the ensemble before it writes anything; released, it trains."""
    configs = [toy_config("quick", dataset=d, seed=0, **TINY) for d in ("8gaussians", "moons")]
    member = run_directory(configs[1], tmp_path)
    with FolderLock(member):
        with pytest.raises(RuntimeError, match=f"{member.name} is in use"):
            run_toy_ensemble(configs, tmp_path, progress=False)
    assert not (ensemble_directory(ToyEnsembleConfig(tuple(configs)), tmp_path) / "checkpoint.pt").exists()
    assert run_toy_ensemble(configs, tmp_path, progress=False)["status"] == "finished"


def test_ensemble_resume_equals_uninterrupted(tmp_path):
    configs = [toy_config("quick", dataset=d, seed=s, **{**TINY, "iterations": 8, "test_every": 2})
               for d, s in [("8gaussians", 0), ("8gaussians", 1)]]
    whole = run_toy_ensemble(configs, tmp_path / "whole", progress=False)
    part = run_toy_ensemble(configs, tmp_path / "split", progress=False, stop_after=3)
    assert part["status"] == "interrupted"
    assert (ensemble_directory(ToyEnsembleConfig(tuple(configs)), tmp_path / "split") / "checkpoint.pt").is_file()
    assert pending_members(configs, tmp_path / "split") == configs  # still pending, as one ensemble
    resumed = run_toy_ensemble(configs, tmp_path / "split", progress=False)
    assert [t["members"] for t in resumed["tests"]] == [t["members"] for t in whole["tests"]]


@pytest.mark.filterwarnings("ignore::monoflow.solvers.SolverWarning")  # the nan never converges
def test_divergence_names_the_diverged_member(tmp_path, monkeypatch):
    """A member whose parameters turn non-finite stops the ensemble with an error naming it (its
    nan surfaces as a solver or input error, or as a nan loss, depending on where it lands)."""
    from monoflow.experiments.toy2d_ensemble import ToyEnsembleExperiment

    build = ToyEnsembleExperiment.build_model

    def poisoned(self):
        model = build(self)
        with torch.no_grad():
            self.flows[1].blocks[0].g.layers[0].linear.weight[0, 0] = float("nan")
        return model

    monkeypatch.setattr(ToyEnsembleExperiment, "build_model", poisoned)
    configs = [toy_config("quick", dataset=d, **TINY) for d in ("moons", "circles")]
    with pytest.raises(RuntimeError, match=r"training diverged .*diverged member\(s\): circles seed 0;"):
        run_toy_ensemble(configs, tmp_path, progress=False)
    log = (ensemble_directory(ToyEnsembleConfig(tuple(configs)), tmp_path) / "train.log").read_text()
    assert "diverged: " in log and "circles seed 0" in log


def test_pending_members_leaves_runs_started_alone(tmp_path):
    configs = [toy_config("quick", dataset=d, **TINY) for d in ("moons", "circles", "rings")]
    run_toy(configs[0], tmp_path, progress=False)
    run_toy(configs[1], tmp_path, progress=False, stop_after=2)
    assert pending_members(configs, tmp_path) == [configs[2]]


def test_table1_together_through_the_cli(tmp_path, capsys):
    out = str(tmp_path)
    tiny = [item for key, value in TINY.items() for item in ("--set", f"{key}={value}")]
    argv = ["table1", "--together", "--datasets", "moons", "rings", "--models", "idensenet",
            "--output", out, "--no-progress", *tiny]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[together] idensenet: 2 runs as one ensemble" in printed
    assert (tmp_path / "tables").is_dir()
    assert main(argv) == 0  # everything finished: nothing trains again
    assert "[together]" not in capsys.readouterr().out

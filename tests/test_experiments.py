"""Experiment layer: configs and presets, tiny runs of every model, exact resumption, run.json,
tables against hand-computed aggregates, figures."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from monoflow.experiments import (
    REGRESSION_MODELS,
    TOY_MODELS,
    RegressionConfig,
    ToyConfig,
    find_runs,
    load_run,
    regression_config,
    regression_table,
    run_regression,
    run_toy,
    toy_config,
    toy_table,
    write_tables,
)
from monoflow.checkpoint import load_checkpoint, save_checkpoint
from monoflow.experiments.config import config_from_dict, config_to_dict, lr_factor, parse_overrides
from monoflow.experiments.evaluate import evaluate_checkpoint, sample_checkpoint
from monoflow.experiments.figures import plot_regression_fits, plot_toy_grid, plot_toy_run
from monoflow.experiments.results import run_directory, write_run

TINY_TOY = dict(nblocks=2, depth=1, growth=8, batch_size=64, iterations=6, test_every=3, test_samples=128,
                report_last=2, roundtrip_points=32, figure_grid=16, figure_samples=128, learnable_concat_from=3)
TINY_1D = dict(depth=1, growth=8, batch_size=64, iterations=6, test_every=3, test_samples=128, report_last=1,
               roundtrip_points=32, figure_points=40, lr_milestones=(2, 4), lr_factors=(0.2, 0.04))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and far faster on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- configurations ---------------------------------------------------------------------------

def test_paper_presets_are_the_papers_settings():
    toy = toy_config("paper")
    assert (toy.iterations, toy.batch_size, toy.lr, toy.weight_decay) == (50000, 500, 1e-3, 1e-5)
    assert (toy.power_iterations, toy.learnable_concat_from, toy.test_every, toy.test_samples) == (5, 25000, 100, 10000)
    assert (toy.report_last, toy.nblocks, toy.depth, toy.growth, toy.coeff, toy.lip_coeff) == (20, 10, 3, 16, 0.9, 0.98)
    assert toy.logdet == "exact" and toy.seed == 0
    one = regression_config("paper")
    assert (one.iterations, one.batch_size, one.lr, one.weight_decay) == (15000, 5000, 0.01, 0.0)
    assert (one.depth, one.growth, one.coeff, one.lip_coeff, one.learnable_concat_from) == (4, 128, 0.99, 0.99, 0)
    assert (one.test_every, one.test_samples) == (100, 10000)
    # lr x0.2 after 5000 iterations and x0.04 after 10000 (relative to the base rate)
    assert [lr_factor(one, step) for step in (0, 4999, 5000, 9999, 10000, 14999)] == [1, 1, 0.2, 0.2, 0.04, 0.04]
    # the paper's last 20 tests are iterations 48100 ... 50000
    assert [step for step in range(100, 50001, 100)][-toy.report_last:][0] == 48100


def test_quick_preset_and_overrides():
    quick = toy_config("quick")
    assert quick.iterations == 2000 and quick.report_last == 5 and quick.test_samples == 2000
    assert dataclasses.replace(quick, iterations=300).iterations == 300
    assert toy_config("quick", iterations=300, dataset="rings").dataset == "rings"
    assert regression_config("quick").iterations <= 2000
    with pytest.raises(ValueError, match="valid fields: preset, seed"):
        toy_config("quick", iteration=3)
    with pytest.raises(ValueError, match="valid presets"):
        toy_config("fast")
    with pytest.raises(ValueError, match="valid names"):
        toy_config(dataset="moon")
    with pytest.raises(ValueError, match="valid models"):
        regression_config(model="monotone")
    with pytest.raises(ValueError, match="positive"):
        toy_config(iterations=0)
    with pytest.raises(ValueError, match="same length"):
        regression_config(lr_milestones=(1, 2), lr_factors=(0.5,))


def test_parse_overrides_types_and_round_trip():
    values = parse_overrides(RegressionConfig, ["iterations=5e3", "lr=0.02", "model=residual", "lr_milestones=10,20",
                                                "lr_factors=0.5,0.1"])
    assert values == {"iterations": 5000, "lr": 0.02, "model": "residual", "lr_milestones": (10, 20),
                      "lr_factors": (0.5, 0.1)}
    with pytest.raises(ValueError, match="as int"):
        parse_overrides(ToyConfig, ["iterations=2.5"])
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(ToyConfig, ["iterations"])
    with pytest.raises(ValueError, match="valid fields"):
        parse_overrides(ToyConfig, ["nope=1"])
    config = regression_config("quick", **values)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"a": torch.arange(3)})
    save_checkpoint(path, {"a": torch.arange(4)})
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(4))
    assert os.listdir(tmp_path) == ["c.pt"]
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


# --- tiny runs of every model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    records = {}
    for model in TOY_MODELS:
        records[("toy2d", model)] = run_toy(toy_config("quick", model=model, dataset="moons", **TINY_TOY), root, progress=False)
    for model in REGRESSION_MODELS:
        records[("regression1d", model)] = run_regression(regression_config("quick", model=model, **TINY_1D), root, progress=False)
    return root, records


def test_run_json_schema(results):
    root, records = results
    for (experiment, model), record in records.items():
        on_disk = load_run(record["run_dir"])
        assert on_disk["status"] == "finished" and on_disk["experiment"] == experiment and on_disk["model"] == model
        tests = on_disk["tests"]
        assert [test["iteration"] for test in tests] == [3, 6]
        report_last = on_disk["config"]["report_last"]
        assert on_disk["final_metric"] == pytest.approx(np.mean([t["metric"] for t in tests[-report_last:]]))
        for test in tests:
            assert math.isfinite(test["metric"]) and test["roundtrip_max_abs_error"] < 1e-3
            # every model inverts by a fixed-point solve; only implicit forward passes solve too
            assert test["solver"]["inverse_converged_fraction"] == 1.0
            assert not any(key.startswith("adjoint") for key in test["solver"])
            assert not any(key.startswith("inverse") for key in test["train_solver"])
            if model.startswith(("monotone", "implicit")):
                assert test["solver"]["forward_converged_fraction"] == 1.0
                assert test["train_solver"]["adjoint_converged_fraction"] == 1.0
        timing = on_disk["timing"]
        assert timing["iterations"] == 6 and timing["wall_time_s"] > 0
        assert timing["per_iteration_s"] == pytest.approx(sum(timing["per_iteration_breakdown_s"].values()))
        assert set(timing["per_iteration_breakdown_s"]) == {"data", "forward", "backward", "optimizer"}
        for key in ("monoflow_version", "git_commit", "torch_version", "device"):
            assert on_disk["provenance"][key]
        assert on_disk["parameters"] > 0 and on_disk["seed"] == 0
        assert config_from_dict(on_disk["config"]).model == model
        run_dir = Path(record["run_dir"])
        figure = "figure" if experiment == "toy2d" else "fit"
        assert (run_dir / f"{figure}.png").stat().st_size > 0 and (run_dir / f"{figure}.npz").is_file()
        assert run_dir == run_directory(config_from_dict(on_disk["config"]), root)
    toy = records[("toy2d", "monotone")]
    assert toy["metric_name"] == "nll_nats" and toy["dataset"] == "moons"
    # the density on the [-4, 4]^2 grid is a density: its mass there is at most 1
    assert 0 < toy["figure"]["density_mass_on_grid"] < 1.05


def test_learning_rate_schedule_is_applied(results):
    _, records = results
    tests = records[("regression1d", "residual")]["tests"]
    assert [t["lr"] for t in tests] == [pytest.approx(0.01 * 0.2), pytest.approx(0.01 * 0.04)]


def test_finished_run_is_skipped(results):
    root, records = results
    config = toy_config("quick", model="monotone", dataset="moons", **TINY_TOY)
    checkpoint = Path(records[("toy2d", "monotone")]["run_dir"]) / "checkpoint.pt"
    stamp = checkpoint.stat().st_mtime_ns
    again = run_toy(config, root, progress=False)
    assert again["final_metric"] == records[("toy2d", "monotone")]["final_metric"]
    assert checkpoint.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="different configuration"):
        run_toy(dataclasses.replace(config, lr=0.5), root, progress=False)


@pytest.mark.parametrize("experiment", ["toy2d", "regression1d"])
def test_resume_equals_uninterrupted(tmp_path, experiment):
    if experiment == "toy2d":
        config, run = toy_config("quick", dataset="8gaussians", **{**TINY_TOY, "iterations": 8, "test_every": 2}), run_toy
    else:
        config, run = regression_config("quick", model="monotone_actnorm", **{**TINY_1D, "iterations": 8, "test_every": 2}), run_regression
    whole = run(config, tmp_path / "whole", progress=False)
    part = run(config, tmp_path / "split", progress=False, stop_after=3)
    assert part["status"] == "interrupted" and part["step"] == 3
    assert not (Path(run_directory(config, tmp_path / "split")) / "run.json").exists()
    resumed = run(config, tmp_path / "split", progress=False)
    assert [session["iteration"] for session in resumed["sessions"]] == [0, 3]
    assert all(session["git_commit"] and session["device"] for session in resumed["sessions"])
    assert [t["metric"] for t in whole["tests"]] == [t["metric"] for t in resumed["tests"]]
    assert [t["train_loss"] for t in whole["tests"]] == [t["train_loss"] for t in resumed["tests"]]
    a = load_checkpoint(run_directory(config, tmp_path / "whole") / "checkpoint.pt")
    b = load_checkpoint(run_directory(config, tmp_path / "split") / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # a different seed gives a different run (the comparison above can fail)
    other = run(dataclasses.replace(config, seed=1), tmp_path / "whole", progress=False)
    assert [t["metric"] for t in other["tests"]] != [t["metric"] for t in whole["tests"]]


def test_a_run_another_process_is_training_is_refused(tmp_path):
    """Two processes training one run would overwrite each other's checkpoint: the second stops
    with an error naming the folder and the process that holds it, before writing anything; a
    killed holder leaves no stale lock."""
    config = toy_config("quick", dataset="moons", **TINY_TOY)
    folder = run_directory(config, tmp_path)
    script = ("import sys, time\nfrom monoflow.checkpoint import FolderLock\n"
              "lock = FolderLock(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"{folder.name} is in use: process {holder.pid} on .*rerun"):
            run_toy(config, tmp_path, progress=False)
        assert sorted(p.name for p in folder.iterdir()) == [".training.lock"]
    finally:
        holder.kill()
        holder.wait()
    assert run_toy(config, tmp_path, progress=False)["status"] == "finished"


def test_crash_resumes_from_time_based_checkpoint(tmp_path):
    """A run killed mid-way (here: an exception in the 2nd test) resumes from its last periodic
    checkpoint and ends exactly as an uninterrupted run."""
    from monoflow.experiments.toy2d import ToyExperiment
    from monoflow.experiments.train import train

    class Crashing(ToyExperiment):
        def evaluate(self, model, generator, device):
            if len(self.seen) == 1:
                self.seen.append("crash")
                raise KeyboardInterrupt("simulated kill")
            self.seen.append("test")
            return super().evaluate(model, generator, device)

    config = toy_config("quick", dataset="pinwheel", **{**TINY_TOY, "checkpoint_every_s": 1e-9})
    crashing = Crashing(config)
    crashing.seen = []
    with pytest.raises(KeyboardInterrupt):
        train(crashing, tmp_path / "crashed", progress=False)
    assert load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")["state"]["step"] == 5
    resumed = train(ToyExperiment(config), tmp_path / "crashed", progress=False)
    whole = train(ToyExperiment(config), tmp_path / "whole", progress=False)
    assert [t["metric"] for t in resumed["tests"]] == [t["metric"] for t in whole["tests"]]
    a = load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert "resumed from checkpoint.pt at iteration 5" in (tmp_path / "crashed" / "train.log").read_text()


@pytest.mark.filterwarnings("ignore::monoflow.solvers.SolverWarning")  # the nan never converges
@pytest.mark.parametrize("model", ["monotone", "idensenet"])
def test_non_finite_parameters_stop_the_run_with_a_divergence_error(tmp_path, monkeypatch, model):
    from monoflow.experiments.toy2d import ToyExperiment

    build = ToyExperiment.build_model

    def poisoned(self):
        flow = build(self)
        with torch.no_grad():
            flow.blocks[0].g.layers[0].linear.weight[0, 0] = float("inf")
        return flow

    monkeypatch.setattr(ToyExperiment, "build_model", poisoned)
    config = toy_config("quick", model=model, dataset="moons", **TINY_TOY)
    with pytest.raises(RuntimeError, match=r"training diverged \((non-finite parameters \(blocks\.0\.g|loss nan)"):
        run_toy(config, tmp_path, progress=False)
    assert "diverged: " in (run_directory(config, tmp_path) / "train.log").read_text()


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_exactly(tmp_path):
    """SIGTERM (a scheduler's preemption) mid-run: the loop finishes the step, saves, returns
    ``interrupted``; the same call resumes and ends exactly as an uninterrupted run."""
    import os
    import signal

    from monoflow.experiments.toy2d import ToyExperiment
    from monoflow.experiments.train import train

    class Preempted(ToyExperiment):
        def evaluate(self, model, generator, device):
            if not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)
            return super().evaluate(model, generator, device)

    config = toy_config("quick", dataset="moons", **TINY_TOY)
    preempted = Preempted(config)
    preempted.sent = False
    handler_before = signal.getsignal(signal.SIGTERM)
    stopped = train(preempted, tmp_path / "stopped", progress=False)
    assert stopped["status"] == "interrupted" and stopped["signal"] == signal.SIGTERM and stopped["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == handler_before
    assert not (tmp_path / "stopped" / "run.json").exists()
    assert "stopped at iteration 3 (signal" in (tmp_path / "stopped" / "train.log").read_text()
    resumed = train(ToyExperiment(config), tmp_path / "stopped", progress=False)
    whole = train(ToyExperiment(config), tmp_path / "whole", progress=False)
    assert [t["metric"] for t in resumed["tests"]] == [t["metric"] for t in whole["tests"]]


def test_evaluate_and_sample_checkpoint(results):
    _, records = results
    run_dir = records[("toy2d", "idensenet")]["run_dir"]
    evaluated = evaluate_checkpoint(run_dir, samples=64, seed=3)
    assert evaluated["metric_name"] == "nll_nats" and math.isfinite(evaluated["metric"]) and evaluated["iteration"] == 6
    assert evaluate_checkpoint(run_dir, samples=64, seed=3)["metric"] == evaluated["metric"]
    samples = sample_checkpoint(run_dir, 50, seed=1)
    assert samples.shape == (50, 2) and np.isfinite(samples).all()
    assert np.array_equal(samples, sample_checkpoint(run_dir, 50, seed=1))
    one_d = records[("regression1d", "monotone_actnorm")]
    assert one_d["sessions"][0]["solves"].startswith("scalar")  # how the 1-D flows solved, on record
    from monoflow.data import sample_staircase
    from monoflow.experiments.evaluate import load_model

    model, config = load_model(one_d["run_dir"])
    x, y = sample_staircase(100, torch.Generator().manual_seed(4))
    with torch.no_grad():
        direct = float(((model(x)[0] - y) ** 2).mean())
    assert evaluate_checkpoint(one_d["run_dir"], samples=100, seed=4)["metric"] == pytest.approx(direct, rel=1e-5)
    with pytest.raises(ValueError, match="toy2d"):
        sample_checkpoint(one_d["run_dir"], 5)
    with pytest.raises(FileNotFoundError):
        evaluate_checkpoint(Path(run_dir) / "nowhere")


@pytest.mark.parametrize("model", ["idensenet", "monotone"])
def test_checkpoint_evaluates_to_the_runs_last_test(tmp_path, model):
    """Replaying the run's test stream, the loaded checkpoint scores its last test's points as the
    trained model did: learned concatenation scales (switched on at step 0, moved by a large
    learning rate) must be in use after loading, not only stored."""
    from monoflow.data import sample_toy
    from monoflow.experiments.evaluate import load_model
    from monoflow.experiments.toy2d import toy_test
    from monoflow.experiments.train import derived_seed

    config = toy_config("quick", model=model, dataset="moons", **{**TINY_TOY, "learnable_concat_from": 0, "lr": 0.05})
    record = run_toy(config, tmp_path, progress=False)
    flow, loaded = load_model(record["run_dir"])
    scales = [p.item() for name, p in flow.named_parameters() if name.endswith("K1")]
    assert scales and max(abs(k - 1.0) for k in scales) > 0.05  # the scales did move
    stream = torch.Generator().manual_seed(derived_seed(config.seed, "test"))
    for _ in record["tests"][:-1]:
        sample_toy(config.dataset, config.test_samples, stream)
    replayed = toy_test(flow, loaded, stream)
    assert replayed["metric"] == pytest.approx(record["tests"][-1]["metric"], abs=1e-5)


@pytest.mark.parametrize("model", ["monotone", "resflow"])
def test_test_metric_is_the_negative_log_likelihood(results, model):
    """The test NLL (computed under no_grad) against the change of variables with the flow's
    Jacobian taken by autograd, one sample at a time."""
    from monoflow.data import sample_toy
    from monoflow.experiments.evaluate import load_model
    from monoflow.experiments.toy2d import toy_test

    _, records = results
    flow, config = load_model(records[("toy2d", model)]["run_dir"])
    config = dataclasses.replace(config, test_samples=12, roundtrip_points=12)
    result = toy_test(flow, config, torch.Generator().manual_seed(5))
    x = sample_toy(config.dataset, 12, torch.Generator().manual_seed(5))
    log_p = []
    for point in x:
        z = flow(point[None])[0][0].detach()
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None], with_logdet=False)[0][0], point)
        log_p.append(-0.5 * float(z @ z) - math.log(2 * math.pi) + float(torch.linalg.slogdet(jacobian)[1]))
    assert result["metric"] == pytest.approx(-np.mean(log_p), abs=2e-3)
    with torch.no_grad():  # the round trip, recomputed with a forward pass of its own
        back = flow.inverse(flow(x, with_logdet=False)[0], with_logdet=False)[0]
    assert result["roundtrip_max_abs_error"] == pytest.approx(float((back - x).abs().max()), abs=1e-4)
    assert result["solver"]["inverse_converged_fraction"] == 1.0


def test_tables_and_figures_from_real_runs(results):
    root, _ = results
    assert len(find_runs(root, "toy2d")) == 3 and len(find_runs(root, "regression1d", "quick")) == 4
    assert find_runs(root, "toy2d", preset="paper") == []
    table = toy_table(root)
    assert sorted(table["model"]) == sorted(TOY_MODELS) and (table["seeds"] == 1).all()
    paper = {"idensenet": 2.401, "monotone": 2.400}
    for _, row in table.iterrows():
        if row["model"] in paper:
            assert row["paper_nats"] == pytest.approx(paper[row["model"]])
            assert row["difference"] == pytest.approx(row["nll_nats_mean"] - row["paper_nats"])
        else:
            assert math.isnan(row["paper_nats"])
    one_d = regression_table(root)
    assert list(one_d["model"]) == sorted(REGRESSION_MODELS)
    assert one_d.set_index("model").loc["residual", "paper_mse"] == pytest.approx(0.016)
    written = write_tables(root)
    assert sorted(path.name for path in written) == ["figure4_regression1d_quick.csv", "table1_toy2d_quick.csv"]
    assert len(pd.read_csv(root / "tables" / "table1_toy2d_quick.csv")) == 3
    import matplotlib.pyplot as plt

    figure = plot_toy_run(find_runs(root, "toy2d")[0])
    assert len(figure.axes) == 3
    _, ax = plt.subplots()
    plot_toy_run(find_runs(root, "toy2d")[0]["run_dir"], ax=ax)
    figure = plot_toy_grid(root, "quick", ["idensenet", "monotone"], ["moons", "rings"])
    assert len(figure.axes) == 6
    figure = plot_regression_fits(root, "quick")
    assert len(figure.axes) == 4
    plt.close("all")


def _fake_run(root: Path, dataset: str, model: str, seed: int, metric: float, preset: str = "paper") -> None:
    run_dir = root / "toy2d" / preset / model / dataset / f"seed{seed}"
    write_run(run_dir, {
        "experiment": "toy2d", "status": "finished", "preset": preset, "model": model, "dataset": dataset,
        "seed": seed, "final_metric": metric, "timing": {"iterations": 50000, "wall_time_s": 100.0 * (seed + 1)},
        "provenance": {"device": "cpu"},
    })


def test_toy_table_aggregates_seeds(tmp_path):
    for seed, metric in enumerate([2.5, 2.7, 2.9]):
        _fake_run(tmp_path, "rings", "monotone", seed, metric)
    _fake_run(tmp_path, "rings", "idensenet", 0, 3.0)
    (tmp_path / "toy2d" / "paper" / "monotone" / "rings" / "seed9").mkdir(parents=True)  # unfinished run
    table = toy_table(tmp_path, preset="paper").set_index("model")
    assert table.loc["monotone", "seeds"] == 3
    assert table.loc["monotone", "nll_nats_mean"] == pytest.approx(2.7)
    assert table.loc["monotone", "nll_nats_std"] == pytest.approx(0.2)
    assert table.loc["monotone", "paper_nats"] == pytest.approx(2.665)
    assert table.loc["monotone", "difference"] == pytest.approx(2.7 - 2.665)
    assert table.loc["monotone", "wall_time_s"] == pytest.approx(200.0)
    assert math.isnan(table.loc["idensenet", "nll_nats_std"])
    assert table.loc["idensenet", "difference"] == pytest.approx(3.0 - 2.884)
    assert list(toy_table(tmp_path / "empty").columns)[:3] == ["dataset", "model", "preset"]
    with pytest.raises(ValueError, match="unknown experiment"):
        find_runs(tmp_path, "images2d")


def test_seed_spread_compares_the_paper_gap_with_seed_noise(tmp_path):
    for seed, (mono, dense) in enumerate([(2.6, 3.0), (2.7, 2.9), (2.8, 3.1)]):
        _fake_run(tmp_path, "rings", "monotone", seed, mono)
        _fake_run(tmp_path, "rings", "idensenet", seed, dense)
    _fake_run(tmp_path, "moons", "monotone", 0, 2.4)  # one seed, one model: no row
    from monoflow.experiments import toy_seed_spread
    spread = toy_seed_spread(toy_table(tmp_path))
    assert list(spread["dataset"]) == ["rings"]
    row = spread.iloc[0]
    assert row["seeds"] == 3
    assert row["gap_ours"] == pytest.approx(3.0 - 2.7)
    assert row["gap_paper"] == pytest.approx(2.884 - 2.665)
    assert row["single_run_gap_std"] == pytest.approx(math.hypot(0.1, 0.1))
    assert row["paper_gap_in_stds"] == pytest.approx((2.884 - 2.665) / math.hypot(0.1, 0.1))
    assert toy_seed_spread(toy_table(tmp_path), min_seeds=4).empty


def test_late_improvement_of_a_test_curve():
    from monoflow.experiments.results import late_improvement
    falling = {"tests": [{"iteration": i, "metric": 10.0 - i} for i in range(8)]}
    assert late_improvement(falling) == pytest.approx(2.0)  # metrics 10..3: (6 + 5) / 2 - (4 + 3) / 2
    flat = {"tests": [{"iteration": i, "metric": 1.0} for i in range(8)]}
    assert late_improvement(flat) == 0.0
    assert math.isnan(late_improvement({"tests": [{"iteration": 0, "metric": 1.0}]}))

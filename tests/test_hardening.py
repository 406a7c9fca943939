"""Bad and hostile inputs (issue #21): each one gets a clear error or the correct result.

Grouped as in the issue: 1 checkpoints never run code, 2 solvers never call a non-finite residual
converged, 3 Lipschitz guarantees, 4 image runs resume with the same settings or refuse, 5 the CLI
answers every user error in one line, 6 layers that cannot be poisoned, 7 notebook parameters.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from monoflow.checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from monoflow.cli import main

TINY = ["--set", "nblocks=2", "--set", "depth=1", "--set", "growth=8", "--set", "batch_size=32",
        "--set", "iterations=4", "--set", "test_every=2", "--set", "test_samples=64", "--set", "report_last=2",
        "--set", "figure_grid=12", "--set", "figure_samples=64", "--set", "roundtrip_points=16", "--threads", "1",
        "--no-progress"]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class _RunsCode:
    """Pickles to a call of ``Path.touch``: loading it with plain pickle creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _hostile_checkpoint(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": {}, "model": {}, "optimizer": {}, "state": {}, "rng": _RunsCode(marker)}, path)


def _toy_run_dir(root: Path) -> Path:
    from monoflow.experiments import toy_config
    from monoflow.experiments.config import ToyConfig, parse_overrides
    from monoflow.experiments.results import run_directory

    overrides = parse_overrides(ToyConfig, [value for flag, value in zip(TINY, TINY[1:]) if flag == "--set"])
    return run_directory(toy_config("quick", dataset="moons", **overrides), root)


@pytest.fixture(scope="module")
def finished_toy(tmp_path_factory) -> Path:
    """A finished tiny toy run (its results folder)."""
    root = tmp_path_factory.mktemp("toy")
    assert main(["toy2d", "--dataset", "moons", "-o", str(root), *TINY]) == 0
    return root


# 1. Security --------------------------------------------------------------------------------------


def test_hostile_checkpoint_does_not_run_code_through_evaluate(tmp_path, capsys):
    marker = tmp_path / "ran"
    _hostile_checkpoint(tmp_path / "run" / "checkpoint.pt", marker)
    assert main(["evaluate", str(tmp_path / "run")]) == 1
    assert not marker.exists()
    error = capsys.readouterr().err
    assert "checkpoint.pt" in error and "could run code" in error and "delete" in error


def test_hostile_checkpoint_does_not_run_code_through_toy_resume(tmp_path, capsys):
    marker = tmp_path / "ran"
    _hostile_checkpoint(_toy_run_dir(tmp_path) / "checkpoint.pt", marker)
    assert main(["toy2d", "--dataset", "moons", "-o", str(tmp_path), *TINY]) == 1
    assert not marker.exists()
    assert "could run code" in capsys.readouterr().err


def test_hostile_image_checkpoint_and_rng_file_are_refused(tmp_path):
    from monoflow.images.checkpoint import load_checkpoint as load_image_checkpoint, load_rng_state

    marker = tmp_path / "ran"
    torch.save({"preset": _RunsCode(marker)}, tmp_path / "checkpoint.pt")
    torch.save({"torch": _RunsCode(marker)}, tmp_path / "rng_rank0.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        load_image_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="could run code"):
        load_rng_state(tmp_path, 0)
    assert not marker.exists()


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"),
    (b"not a checkpoint at all\n" * 10, "damaged or not a torch file"),
    ("truncated", "damaged or not a torch file"),
    ("tensor", "not a monoflow checkpoint"),
    ("foreign", "not a monoflow checkpoint of this kind"),
])
def test_unreadable_checkpoints_name_the_file_and_say_delete(tmp_path, content, reason, capsys):
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    if content == "truncated":
        save_checkpoint(path, {"model": {"w": torch.zeros(100)}, "config": {}, "state": {}})
        path.write_bytes(path.read_bytes()[:200])
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(3)}, "epoch": 3}, path)
    else:
        path.write_bytes(content)
    assert main(["evaluate", str(path)]) == 1
    error = capsys.readouterr().err
    assert reason in error and str(path) in error and "delete" in error
    assert error.count("\n") == 1


def test_random_states_are_plain_tensors_and_lists_and_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(5)
    np.random.standard_normal()  # numpy caches the second normal of a pair: part of the state
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state(data=generator)})
    # plain torch.load with weights_only=True reads it: nothing but tensors and containers
    state = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    assert isinstance(state["numpy"]["key"], torch.Tensor) and isinstance(state["python"]["state"], list)
    import random

    draw = lambda: (torch.rand(3).tolist(), np.random.standard_normal(), random.random(),  # noqa: E731
                    torch.rand(2, generator=generator).tolist())
    first = draw()
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"], data=generator)
    assert draw() == first


def test_checkpoints_written_before_the_tensor_format_still_load(tmp_path):
    """Older checkpoints pickled numpy's RNG state as an array: rebuilding it runs no code."""
    import random

    torch.save({"rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate(), "generators": {}}}, tmp_path / "old.pt")
    first = (np.random.rand(), random.random())
    restore_rng_state(load_checkpoint(tmp_path / "old.pt")["rng"])
    assert (np.random.rand(), random.random()) == first


def test_no_weights_only_false_left_in_the_package():
    package = Path(__file__).resolve().parents[1] / "monoflow"
    offenders = [str(p) for p in package.rglob("*.py") if "weights_only=False" in p.read_text()]
    assert offenders == []


# 2. Solver honesty --------------------------------------------------------------------------------


def test_a_non_finite_residual_is_never_converged():
    from monoflow.solvers import SolverInfo

    info = SolverInfo(iterations=torch.ones(3, dtype=torch.long), residual=torch.tensor([0.0, float("inf"), float("nan")]),
                      converged=torch.ones(3, dtype=torch.bool), evaluations=1)
    assert info.converged.tolist() == [True, False, False]
    assert info.summary()["converged_fraction"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("policy", ["raise", "nan", "warn"])
def test_an_overflowing_solve_triggers_the_failure_policy(policy):
    from monoflow.solvers import SolverError, SolverOptions, SolverWarning, fixed_point_solve

    def f(z, index):  # a contraction whose iterates are too large for float32 norms
        return 0.5 * z + 3e19

    # the first residual norm overflows to inf (once called converged: inf <= atol + rtol * inf)
    options = SolverOptions(on_failure=policy, max_iterations=2)
    z0 = torch.full((2, 4), 1e20)
    if policy == "raise":
        with pytest.raises(SolverError, match="did not converge"):
            fixed_point_solve(f, z0, options)
    elif policy == "warn":
        with pytest.warns(SolverWarning):
            _, info = fixed_point_solve(f, z0, options)
        assert info.summary()["converged_fraction"] == 0.0
    else:
        z, info = fixed_point_solve(f, z0, options)
        assert not info.converged.any() and torch.isnan(z).all()


def test_a_monotone_block_on_huge_inputs_is_not_reported_converged():
    """At 1e20 the float32 norm of the solution overflows; the solve once stopped after one
    iteration, residual 1e19, "converged". Now a converged sample meets a finite test (or is an
    exact fixed point), and an unconverged one triggers the policy."""
    from monoflow.blocks import MonotoneBlock
    from monoflow.lipschitz import dense_mlp
    from monoflow.solvers import SolverError, SolverOptions

    torch.manual_seed(0)
    g = dense_mlp(2, 2, 8, "cpila", coeff=0.9, lip_coeff=0.98)
    block = MonotoneBlock(g, logdet=None, solver=SolverOptions(on_failure="raise", max_iterations=1))
    with pytest.raises(SolverError):
        block(torch.full((3, 2), 1e20))
    block.solver = SolverOptions(on_failure="nan", max_iterations=100)
    y, _ = block(torch.full((3, 2), 1e20))
    info = block.last_solves["forward"]
    assert bool(torch.isfinite(info.residual[info.converged]).all())
    assert not bool((info.converged & (info.residual > 1e10)).any())
    assert bool(torch.isnan(y[~info.converged]).all())


# 5. The command line: one line and a non-zero status for anything a user can cause ----------------


def _one_line_error(capsys, *words: str) -> str:
    error = capsys.readouterr().err
    assert "Traceback" not in error and len([line for line in error.splitlines() if "error:" in line]) == 1, error
    for word in words:
        assert word in error, error
    return error


def test_an_output_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    assert main(["toy2d", "--dataset", "moons", "-o", str(tmp_path / "taken"), *TINY]) == 1
    _one_line_error(capsys, "Not a directory", "taken")


def test_a_finished_run_is_reread_without_the_lock(finished_toy, monkeypatch, capsys):
    """Rereading needs no write access (a read-only folder); only training takes the lock."""
    import monoflow.experiments.train as train_module

    def read_only(*folders):
        raise PermissionError(13, "Permission denied", str(folders[0]))

    monkeypatch.setattr(train_module, "FolderLock", read_only)
    assert main(["toy2d", "--dataset", "moons", "-o", str(finished_toy), *TINY]) == 0
    assert "nll_nats" in capsys.readouterr().out
    assert main(["evaluate", str(_toy_run_dir(finished_toy)), "--samples", "32"]) == 0
    # training in such a folder (another seed) is the one case that needs the lock
    assert main(["toy2d", "--dataset", "moons", "-o", str(finished_toy), "--seed", "1", *TINY]) == 1
    _one_line_error(capsys, "Permission denied")


@pytest.mark.parametrize("content", ["", "{\"status\": \"finis", "[1, 2]"])
def test_a_corrupt_run_json_is_named(tmp_path, content, capsys):
    run_dir = _toy_run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(content)
    assert main(["toy2d", "--dataset", "moons", "-o", str(tmp_path), *TINY]) == 1
    _one_line_error(capsys, str(run_dir / "run.json"), "delete it")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv", [["toy2d", "--dataset", "moons"], ["evaluate", "somewhere"],
                                  ["images", "train", "--preset", "digits"]])
def test_cuda_on_a_machine_without_it(argv, capsys):
    assert main([*argv, "--device", "cuda"]) == 1
    _one_line_error(capsys, "CUDA is not available", "--device cpu")


def test_a_device_that_is_not_one(capsys):
    assert main(["toy2d", "--dataset", "moons", "--device", "gpu0"]) == 1
    _one_line_error(capsys, "not a torch device")


def test_an_os_error_while_writing_names_the_file(tmp_path, monkeypatch, capsys):
    import monoflow.checkpoint as checkpoint_module

    def full_disk(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, "fsync", full_disk)
    assert main(["toy2d", "--dataset", "moons", "-o", str(tmp_path), *TINY]) == 1
    _one_line_error(capsys, "No space left on device", "checkpoint.pt")
    assert not list(_toy_run_dir(tmp_path).glob(".checkpoint.pt.*"))  # no temporary file left


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(CheckpointError):
        main(["evaluate", str(tmp_path), "--debug"])
    monkeypatch.setenv("MONOFLOW_DEBUG", "1")
    with pytest.raises(CheckpointError):
        main(["evaluate", str(tmp_path)])


@pytest.mark.parametrize("argv, message", [
    (["images", "train", "--preset", "digits", "--iterations", "0"], "--iterations must be >= 1"),
    (["images", "train", "--preset", "digits", "--iterations", "-3"], "--iterations must be >= 1"),
    (["images", "train", "--preset", "digits", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["toy2d", "--dataset", "moons", "--stop-after", "-1"], "--stop-after must be >= 0"),
    (["regression1d", "--stop-after", "-2"], "--stop-after must be >= 0"),
    (["sample", "somewhere", "--n", "0"], "--n must be >= 1"),
    (["evaluate", "somewhere", "--samples", "0"], "--samples must be >= 1"),
    (["toy2d", "--dataset", "moons", "--threads", "0"], "--threads must be >= 1"),
    (["toy2d", "--dataset", "moons", "--seed", "-1"], "--seed must be >= 0"),
    (["images", "train", "--preset", "digits", "--epochs", "0"], "--epochs must be >= 1"),
    (["images", "train", "--preset", "digits", "--lr", "-0.1"], "--lr must be a positive number"),
    (["images", "sample", "--preset", "digits", "--temperature", "nan"], "--temperature must be a positive number"),
])
def test_counts_no_run_can_use_are_refused(argv, message, capsys):
    assert main(argv) == 1
    _one_line_error(capsys, message)


def test_library_refuses_the_same_counts():
    from monoflow.images import train_image_flow

    with pytest.raises(ValueError, match="iterations must be a positive"):
        train_image_flow("digits", iterations=0, progress=False)
    with pytest.raises(ValueError, match="batch_size.* must be >= 1"):
        train_image_flow("digits", training_overrides={"batch_size": 0}, progress=False, device="cpu")


# 4. Image runs resume with their own settings, or refuse --------------------------------------------

TINY_IMAGE_MODEL = dict(image_shape=(1, 4, 4), blocks=(1, 1), growth=8, depth=2, fc_blocks=1, fc_first=8, fc_growth=8,
                        n_levels=17)
TINY_IMAGE_TRAINING = dict(batch_size=8, log_every=1, checkpoint_every=100, warmup_iterations=2, eval_batch_size=20,
                           n_eval_draws=2, n_samples=4, ema_decay=0.9)


def _image_run(run_dir: Path, iterations: int, **training):
    from monoflow.data.images import ImageArray
    from monoflow.images import train_image_flow

    def synthetic(n, seed):
        rng = np.random.default_rng(seed)
        return ImageArray(rng.integers(0, 17, size=(n, 1, 4, 4), dtype=np.uint8), rng.integers(0, 10, size=n), 17,
                          "synthetic")

    return train_image_flow("digits", run_dir=str(run_dir), iterations=iterations, progress=False, device="cpu",
                            model_overrides=TINY_IMAGE_MODEL, training_overrides={**TINY_IMAGE_TRAINING, **training},
                            train_data=synthetic(40, 0), test_data=synthetic(12, 1), final_evaluation=False)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("images") / "run"
    _image_run(run_dir, 2)
    return run_dir


@pytest.mark.parametrize("changed, diff", [
    ({"batch_size": 4}, "batch_size: 8 -> 4"),
    ({"lr": 0.01}, "lr: 0.001 -> 0.01"),
    ({"ema_decay": 0.5}, "ema_decay: 0.9 -> 0.5"),
])
def test_resuming_an_image_run_with_other_settings_is_refused_with_a_diff(image_run, changed, diff):
    from monoflow.images.checkpoint import load_checkpoint as load_image_checkpoint

    before = load_image_checkpoint(image_run)["step"]
    with pytest.raises(ValueError, match="different configuration") as error:
        _image_run(image_run, 4, **changed)
    assert diff in str(error.value)
    assert load_image_checkpoint(image_run)["step"] == before  # nothing trained


def test_an_image_run_may_be_extended_and_change_operational_settings(tmp_path):
    from monoflow.images.checkpoint import load_checkpoint as load_image_checkpoint

    _image_run(tmp_path / "run", 2)
    _image_run(tmp_path / "run", 3, log_every=2, n_eval_draws=3, eval_every=5)
    assert load_image_checkpoint(tmp_path / "run")["step"] == 3


def test_config_changes_ignores_a_new_field_at_its_default():
    from dataclasses import asdict

    from monoflow.images.checkpoint import OPERATIONAL_KEYS, config_changes
    from monoflow.models.image import ImageFlowConfig, ImageTrainingConfig

    current = asdict(ImageFlowConfig())
    older = {key: value for key, value in current.items() if key != "growth"}  # written before 'growth' existed
    assert config_changes(older, current, ImageFlowConfig) == []
    assert config_changes(older, {**current, "growth": current["growth"] + 1}, ImageFlowConfig) == [
        f"growth: {current['growth']} -> {current['growth'] + 1}"]
    assert config_changes({**current, "blocks": list(current["blocks"])}, current, ImageFlowConfig) == []
    assert config_changes({**current, "retired": 3}, current, ImageFlowConfig) == ["retired: 3 -> absent"]
    training = asdict(ImageTrainingConfig())
    assert config_changes(training, {**training, "iterations": 10, "eval_every": 7}, ImageTrainingConfig,
                          OPERATIONAL_KEYS) == []


# 3. Lipschitz guarantees ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5, -0.1, float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["coeff", "lip_coeff"])
def test_coeff_and_lip_coeff_must_lie_in_the_open_unit_interval(name, value):
    from monoflow.lipschitz import dense_mlp

    with pytest.raises(ValueError, match=f"{name} must lie strictly between 0 and 1"):
        dense_mlp(2, 1, 4, **{name: value})


def test_coeff_of_the_wrong_type_is_a_clear_error():
    from monoflow.lipschitz import SpectralNormLinear

    with pytest.raises(TypeError, match="coeff must be a number"):
        SpectralNormLinear(2, 2, coeff="0.9")


class _Stretch(torch.nn.Module):
    """g(w) = a sin(w): a parameter-free map with Lipschitz constant |a|."""

    def __init__(self, a, declare):
        super().__init__()
        self.a = a
        if declare:
            self.lipschitz_constant = abs(a)

    def forward(self, w):
        return self.a * torch.sin(w)


@pytest.mark.parametrize("block", ["MonotoneBlock", "ResidualBlock", "ImplicitBlock"])
def test_a_g_that_cannot_be_bounded_is_refused(block):
    """Lip(g) = 3 once passed; both solves 'converged' and the round trip was off by 8."""
    import monoflow.blocks as blocks

    cls = getattr(blocks, block)
    build = (lambda g: cls(g, g)) if block == "ImplicitBlock" else cls
    with pytest.raises(ValueError, match="cannot bound the Lipschitz constant"):
        build(_Stretch(3.0, declare=False))
    with pytest.raises(ValueError, match="Lipschitz bound 3.0000 >= 1"):
        build(_Stretch(3.0, declare=True))
    with pytest.raises(ValueError, match="cannot bound"):
        build(torch.nn.Sequential(torch.nn.Tanh()))
    build(_Stretch(0.5, declare=True))  # a declared contraction is accepted


def test_the_certificate_matches_an_independent_bound():
    from monoflow.lipschitz import SpectralNormLinear, lipschitz_upper_bound

    torch.manual_seed(0)
    first, second = SpectralNormLinear(3, 5, coeff=0.9), SpectralNormLinear(5, 3, coeff=0.9)
    chain = torch.nn.Sequential(first, torch.nn.Identity(), second)
    exact = [torch.linalg.matrix_norm(layer.normalized_weight().detach().double(), 2).item() for layer in (first, second)]
    assert lipschitz_upper_bound(chain) == pytest.approx(exact[0] * exact[1], rel=1e-6)


def test_finished_toy_runs_record_their_certificates(finished_toy):
    record = json.loads((_toy_run_dir(finished_toy) / "run.json").read_text())
    certificates = record["lipschitz"]
    assert [c["name"] for c in certificates["networks"]] == ["blocks.0.g", "blocks.1.g"]
    assert certificates["all_below_one"] and 0 < certificates["bound_max"] < 1
    assert certificates["bound_max"] == max(c["bound"] for c in certificates["networks"])


def test_finished_regression_runs_record_their_certificates(tmp_path):
    argv = ["regression1d", "-o", str(tmp_path), "--set", "depth=1", "--set", "growth=8", "--set", "batch_size=32",
            "--set", "iterations=4", "--set", "test_every=2", "--set", "test_samples=64", "--set", "figure_points=20",
            "--set", "lr_milestones=2,3", "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    record = json.loads(next(tmp_path.rglob("run.json")).read_text())
    assert len(record["lipschitz"]["networks"]) == 2 and record["lipschitz"]["all_below_one"]


# 6. Layers that cannot be poisoned ------------------------------------------------------------------


@pytest.mark.parametrize("batch, error, message", [
    (torch.tensor([[float("nan"), 1.0], [0.0, 2.0]]), ValueError, "non-finite"),
    (torch.tensor([[float("inf"), 1.0], [0.0, 2.0]]), ValueError, "non-finite"),
    (torch.zeros(0, 2), ValueError, "non-empty"),
    (torch.tensor([[1, 2], [3, 4]]), TypeError, "floating-point"),
])
def test_actnorm_refuses_a_poisoned_first_batch_and_stays_uninitialised(batch, error, message):
    from monoflow.blocks import ActNorm

    layer = ActNorm(2)
    with pytest.raises(error, match=message):
        layer(batch)
    assert not bool(layer.initialized)
    assert torch.equal(layer.log_scale.detach(), torch.zeros(2))
    good = torch.tensor([[0.0, 1.0], [2.0, 5.0], [4.0, 3.0]])
    y, _ = layer(good)  # the next good batch initialises it
    torch.testing.assert_close(y.mean(0), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)


def test_actnorm_on_a_batch_of_one_only_centres():
    from monoflow.blocks import ActNorm

    layer = ActNorm(3)
    x = torch.tensor([[2.0, -1.0, 0.5]])
    y, logdet = layer(x)
    assert torch.equal(y, torch.zeros(1, 3)) and torch.equal(logdet, torch.zeros(1))
    assert torch.equal(layer.log_scale.detach(), torch.zeros(3))  # once: log 1000 = 6.9 per channel
    # with spread in one channel only, that one is normalised and the constant one centred
    layer = ActNorm(2)
    y, _ = layer(torch.tensor([[1.0, 7.0], [3.0, 7.0]]))
    assert y[:, 0].tolist() == pytest.approx([-1.0, 1.0], abs=1e-5) and y[:, 1].tolist() == [0.0, 0.0]


def _blocks_and_flow():
    from monoflow.blocks import ActNorm, ImplicitBlock, MonotoneBlock, ResidualBlock
    from monoflow.flows import Flow
    from monoflow.lipschitz import dense_mlp

    torch.manual_seed(0)
    g = lambda: dense_mlp(2, 1, 4, coeff=0.9)  # noqa: E731
    blocks = {"monotone": MonotoneBlock(g()), "residual": ResidualBlock(g()), "implicit": ImplicitBlock(g(), g()),
              "actnorm": ActNorm(2)}
    blocks["flow"] = Flow([ActNorm(2), MonotoneBlock(g())], event_shape=(2,))
    return blocks


@pytest.mark.parametrize("name", ["monotone", "residual", "implicit", "actnorm", "flow"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("x, error, message", [
    (torch.randn(4, 3), ValueError, "shape"),
    (torch.randn(4, 2, 1), ValueError, "shape"),
    (torch.randn(4, 2, dtype=torch.float64), TypeError, "dtype torch.float64"),
    (torch.ones(4, 2, dtype=torch.long), TypeError, "floating-point"),
])
def test_blocks_and_flows_refuse_the_wrong_layout_or_dtype(name, direction, x, error, message):
    if name == "actnorm" and x.dim() == 3:
        pytest.skip("ActNorm normalises dim 1 of any (batch, channels, ...) layout")
    module = _blocks_and_flow()[name]
    with torch.no_grad():
        module(torch.randn(8, 2))  # ActNorm initialised on good data first
        call = module if direction == "forward" else module.inverse
        with pytest.raises(error, match=message):
            call(x)
        call(torch.randn(4, 2))  # and the right input still works


# 7. Notebook and book parameters --------------------------------------------------------------------

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK_NAMES = ["01_theory", "02_expressivity_1d", "03_toy_densities_2d", "04_images", "05_speed"]


def _parameters_cell(name: str):
    """(source of the 'parameters' cell, source of the first code cell after it)."""
    cells = json.loads((NOTEBOOKS_DIR / f"{name}.ipynb").read_text())["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    index = next(i for i, cell in enumerate(code) if "parameters" in cell.get("metadata", {}).get("tags", []))
    return "".join(code[index]["source"]), "".join(code[index + 1]["source"])


def _defaults(name: str) -> dict:
    namespace: dict = {}
    exec(_parameters_cell(name)[0], namespace)  # the notebook's own defaults (plain assignments)
    namespace.pop("__builtins__")
    return namespace


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_declared_parameters_are_the_notebooks_own(name):
    from monoflow.notebooks.parameters import declared_names

    assert sorted(declared_names(name)) == sorted(_defaults(name))


@pytest.mark.parametrize("name", ["01_theory", "02_expressivity_1d", "03_toy_densities_2d", "05_speed"])
def test_each_notebook_checks_its_parameters_first(name):
    first = _parameters_cell(name)[1]
    assert f'check_parameters("{name}", globals())' in first


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_the_notebooks_defaults_pass(name):
    from monoflow.notebooks.parameters import check_parameters

    check_parameters(name, _defaults(name))  # reads the committed results where it reads any


def _injected(name: str, **values) -> dict:
    """The namespace after papermill injected ``values`` (its cell is in IPython's history ``In``)."""
    injected = "# Parameters\n" + "".join(f"{key} = {value!r}\n" for key, value in values.items())
    namespace = {**_defaults(name), **values}
    namespace["In"] = ["", _parameters_cell(name)[0], injected]
    return namespace


@pytest.mark.parametrize("name, values, message", [
    ("01_theory", {"n_pair": 10}, "unknown parameter 'n_pair' (did you mean 'n_pairs'?)"),
    ("01_theory", {"n_pairs": "many"}, "n_pairs must be an integer"),
    ("01_theory", {"L": 1.5}, "L must lie strictly between 0.0 and 1.0"),
    ("01_theory", {"seed": 1.5}, "seed must be an integer"),
    ("03_toy_densities_2d", {"datasets": "moons"}, "datasets must be a list of names"),
    ("03_toy_densities_2d", {"datasets": ["moon"]}, "unknown entries ['moon']; valid: ['swissroll'"),
    ("03_toy_densities_2d", {"preset": "huge"}, "preset='huge' is not one of ['paper', 'quick']"),
    ("03_toy_densities_2d", {"overrides": {"batchsize": 10}}, "unknown settings ['batchsize']"),
    ("02_expressivity_1d", {"models": ["monotone"]}, "unknown entries ['monotone']"),
    ("02_expressivity_1d", {"rerun": "yes"}, "rerun must be True or False"),
    ("04_images", {"train_preset": "cifar"}, "train_preset='cifar' is not one of"),
    ("04_images", {"iterations": 0}, "iterations must be >= 1"),
    ("05_speed", {"benchmarks_dir": 3}, "benchmarks_dir must be a folder path"),
])
def test_bad_notebook_parameters_are_clear_errors(name, values, message):
    from monoflow.notebooks.parameters import check_parameters

    with pytest.raises(ValueError) as error:
        check_parameters(name, _injected(name, **values))
    assert message in str(error.value) and "Valid parameters:" in str(error.value)


@pytest.mark.parametrize("name, values", [
    ("02_expressivity_1d", {"preset": "paper", "models": ["residual"]}),
    ("03_toy_densities_2d", {"datasets": ["moons"]}),
    ("04_images", {}),
])
def test_a_selection_without_finished_runs_stops_the_notebook(tmp_path, name, values):
    from monoflow.notebooks.parameters import check_parameters

    with pytest.raises(ValueError, match="no finished .* in"):
        check_parameters(name, _injected(name, results_dir=str(tmp_path), **values))
    check_parameters(name, _injected(name, rerun=True, results_dir=str(tmp_path), **values))  # a rerun trains them


def test_a_misspelled_parameter_stops_a_real_notebook_run(tmp_path):
    """End to end through papermill: the first cell after the parameters names the typo."""
    from monoflow.book import NotebookError, execute_notebook

    with pytest.raises(NotebookError, match="unknown parameter 'n_pair'"):
        execute_notebook(NOTEBOOKS_DIR / "01_theory.ipynb", tmp_path / "01.ipynb", {"n_pair": 10},
                         cwd=NOTEBOOKS_DIR, progress=False)


def test_book_refuses_a_parameter_no_notebook_declares(capsys):
    assert main(["book", "--set", "n_pair=5", "--notebook", "01_theory", "--no-progress"]) == 1
    _one_line_error(capsys, "--set n_pair", "did you mean 'n_pairs'?")
    assert main(["book", "-p", "datasets=[moons]", "--notebook", "01_theory", "--no-progress"]) == 1
    _one_line_error(capsys, "no notebook to run (01_theory) declares a parameter 'datasets'")


def test_a_finished_image_run_is_reread_without_the_lock_and_a_corrupt_record_is_named(image_run, tmp_path,
                                                                                         monkeypatch):
    import shutil

    import monoflow.images.training as training

    copy = tmp_path / "run"
    shutil.copytree(image_run, copy)
    _image_run(copy, 2)  # finishes the fixture's run if another test extended nothing

    def read_only(*folders):
        raise PermissionError(13, "Permission denied", str(folders[0]))

    with monkeypatch.context() as patch:
        patch.setattr(training, "FolderLock", read_only)
        assert _image_run(copy, 2)["iterations"] == 2  # reread, no lock needed
        with pytest.raises(PermissionError):
            _image_run(copy, 3)  # extending it trains, which needs the lock
    (copy / "run.json").write_text("{\"kind\": \"ima")
    with pytest.raises(ValueError, match=f"{copy / 'run.json'} is not a valid run record"):
        _image_run(copy, 2)


def test_a_damaged_image_checkpoint_is_named_by_the_image_cli(tmp_path, capsys):
    from monoflow.images.results import run_directory

    run_dir = run_directory(tmp_path, "digits", "monotone", 0)
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"\x00" * 64)
    for action in (["evaluate"], ["sample", "--out", str(tmp_path / "s.png")]):
        assert main(["images", *action, "--preset", "digits", "--results-dir", str(tmp_path), "--device", "cpu"]) == 1
        _one_line_error(capsys, str(run_dir / "checkpoint.pt"), "delete")


# Leftovers: the book shows the certificates, compiled solves, image records, CIFAR-10 pickles -----


def _copied_toy_run(finished_toy: Path, tmp_path: Path, record: bool = True, checkpoint: bool = True) -> Path:
    """A copy of the finished tiny toy run (its results folder), without the certificates in its
    run.json or without its checkpoint if asked."""
    import shutil

    root = tmp_path / "results"
    shutil.copytree(finished_toy, root)
    run_dir = _toy_run_dir(root)
    if not record:
        data = json.loads((run_dir / "run.json").read_text())
        del data["lipschitz"]
        (run_dir / "run.json").write_text(json.dumps(data))
    if not checkpoint:
        (run_dir / "checkpoint.pt").unlink()
    return root


def test_certificates_are_read_from_the_record_else_from_the_checkpoint_else_counted_missing(finished_toy, tmp_path):
    from monoflow.experiments.results import find_runs, lipschitz_certificates

    recorded = json.loads((_toy_run_dir(finished_toy) / "run.json").read_text())["lipschitz"]
    table = lipschitz_certificates(find_runs(finished_toy, "toy2d"))
    assert table[["model", "dataset", "seed", "source"]].values.tolist() == [["monotone", "moons", 0, "run.json"]]
    assert table["bound_max"].iloc[0] == recorded["bound_max"] and table["all_below_one"].iloc[0]

    older = find_runs(_copied_toy_run(finished_toy, tmp_path / "older", record=False), "toy2d")
    from_checkpoint = lipschitz_certificates(older)
    assert from_checkpoint["source"].tolist() == ["checkpoint"]
    assert from_checkpoint["bound_max"].iloc[0] == pytest.approx(recorded["bound_max"], rel=1e-6)
    assert lipschitz_certificates(older, from_checkpoints=False)["source"].tolist() == ["none"]

    neither = lipschitz_certificates(find_runs(_copied_toy_run(finished_toy, tmp_path / "committed", record=False,
                                                               checkpoint=False), "toy2d"))
    assert neither["source"].tolist() == ["none"]
    assert np.isnan(neither["bound_max"].iloc[0]) and neither["all_below_one"].iloc[0] is None


def test_the_command_for_a_run_without_certificates_recreates_it_with_them(finished_toy, tmp_path):
    import shlex

    from monoflow.experiments.results import find_runs, rerun_commands

    runs = find_runs(_copied_toy_run(finished_toy, tmp_path, record=False, checkpoint=False), "toy2d")
    again = tmp_path / "again"
    (command,) = rerun_commands(runs, output=str(again))
    assert command.startswith("monoflow table1 --preset quick --datasets moons --models monotone --seeds 0 ")
    assert "--set nblocks=2" in command and "--set iterations=4" in command
    words = shlex.split(command)
    assert main(words[1:] + ["--threads", "1", "--no-progress"]) == 0
    (rerun,) = find_runs(again, "toy2d")
    assert rerun["config"] == runs[0]["config"]
    assert rerun["lipschitz"]["all_below_one"] and 0 < rerun["lipschitz"]["bound_max"] < 1


def _certificate_cell(name: str) -> str:
    notebook = json.loads((Path(__file__).resolve().parents[1] / "notebooks" / f"{name}.ipynb").read_text())
    (cell,) = [cell for cell in notebook["cells"] if "lipschitz_certificates(" in "".join(cell["source"])]
    return "".join(cell["source"])


def _fake_run(root: Path, config, certificate) -> None:
    from monoflow.experiments.config import config_to_dict
    from monoflow.experiments.results import run_directory, write_run

    write_run(run_directory(config, root), {
        "experiment": config.experiment, "status": "finished", "preset": "quick", "model": config.model,
        "dataset": getattr(config, "dataset", None), "seed": config.seed, "config": config_to_dict(config),
        **({"lipschitz": {"bound_max": certificate, "all_below_one": certificate < 1, "networks": []}}
           if certificate is not None else {})})


@pytest.mark.parametrize("name", ["03_toy_densities_2d", "02_expressivity_1d"])
def test_the_chapters_tabulate_the_certificates_and_count_the_runs_without(tmp_path, name):
    import pandas as pd
    from IPython.display import Markdown

    from monoflow.experiments import regression_config, toy_config
    from monoflow.experiments.results import find_runs, lipschitz_certificates, rerun_commands
    from monoflow.notebooks import html_table

    toy = name.startswith("03")
    build = (lambda seed: toy_config("quick", dataset="moons", model="monotone", seed=seed)) if toy else \
        (lambda seed: regression_config("quick", model="monotone_actnorm", seed=seed))
    _fake_run(tmp_path, build(0), 0.97)
    _fake_run(tmp_path, build(1), None)
    shown = []
    namespace = {"find_runs": find_runs, "lipschitz_certificates": lipschitz_certificates, "rerun_commands": rerun_commands,
                 "source": tmp_path, "preset": None, "models": ["monotone", "monotone_actnorm"], "datasets": ["moons"],
                 "NAMES": {"monotone": "Monotone Flow"}, "paper": pd.DataFrame({"description": {"monotone_actnorm": "(d)"}}),
                 "pd": pd, "html_table": html_table, "display": shown.append, "Markdown": Markdown}
    exec(_certificate_cell(name), namespace)
    table, counted, missing = shown
    assert "0.9700" in table.to_html() and "yes" in table.to_html()
    assert "**1 of 1** runs with a certificate" in counted.data
    assert "**1 of 2 finished runs have no certificate.**" in missing.data
    assert rerun_commands(find_runs(tmp_path, "toy2d" if toy else "regression1d")[1:], output="results-rerun")[0] in missing.data


@pytest.mark.parametrize("residual, norm", [(float("inf"), float("inf")), (float("nan"), float("nan")),
                                            (1.0, float("inf"))])
def test_a_compiled_solve_with_a_non_finite_residual_or_solution_falls_back_to_the_eager_loss(residual, norm):
    from monoflow.blocks import MonotoneBlock
    from monoflow.compiled import CompiledFlowLoss
    from monoflow.models import toy_flow

    torch.manual_seed(0)
    flow = toy_flow("monotone", nblocks=2, depth=1, growth=8)
    loss_fn = CompiledFlowLoss(flow)
    x = torch.randn(16, 2)
    overflowed = ([torch.full((16,), residual)] * 2, [torch.full((16,), norm)] * 2)
    loss_fn._loss = lambda batch: (torch.tensor(0.0), *overflowed)  # what the graph returns when a solve overflows
    assert not loss_fn._record(*overflowed, x)
    assert all(not block.last_solves["forward"].converged.any() for block in flow.blocks if isinstance(block, MonotoneBlock))
    loss = loss_fn(x)
    assert loss_fn.fallbacks == 1 and loss_fn.batches == 1
    assert torch.equal(loss, -flow.log_prob(x).mean())


@pytest.mark.parametrize("content", ["", "{\"kind\": \"ima", "[1, 2]"])
def test_a_corrupt_or_empty_image_record_is_named_by_read_runs(tmp_path, content):
    from monoflow.images.results import read_runs, run_directory

    run_dir = run_directory(tmp_path, "digits", "monotone", 0)
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(content)
    with pytest.raises(ValueError, match=f"{run_dir / 'run.json'} is not a"):
        read_runs(tmp_path)


class _CallsSystem:
    """Pickles to ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_cifar10_batch_that_would_run_code_is_refused_unrun(tmp_path):
    import pickle

    from monoflow.data.images import load_cifar10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": _CallsSystem(f"touch {marker}"), b"labels": [0]}, handle)
    with pytest.raises(pickle.UnpicklingError, match=f"{folder / 'data_batch_1'} is not a CIFAR-10 batch.*system"):
        load_cifar10(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])  # 2: the original batches (Python 2)
def test_cifar10_batches_of_every_pickle_protocol_still_load(tmp_path, protocol):
    import pickle

    from monoflow.data.images import _unpickle

    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    labels = list(np.array([3, 7]))  # numpy integers, as a list built from an array holds
    with open(tmp_path / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"training batch 1 of 5",
                     b"filenames": [b"a.png", b"b.png"]}, handle, protocol=protocol)
    batch = _unpickle(tmp_path / "data_batch_1")
    np.testing.assert_array_equal(batch["data"], data)
    assert batch["labels"] == [3, 7] and batch["filenames"] == [b"a.png", b"b.png"]
    with open(tmp_path / "data_batch_1", "wb") as handle:
        pickle.dump([data], handle, protocol=protocol)
    with pytest.raises(ValueError, match="not a CIFAR-10 batch"):
        _unpickle(tmp_path / "data_batch_1")

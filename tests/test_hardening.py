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

"""The one training loop shared by the 2-D toy and the 1-D regression experiments.

An experiment (:class:`Experiment`) says what differs: how to build the model, draw a batch,
compute the loss, test the model and draw the final figure. :func:`train` does the rest, the same
for both:

1. Adam on all parameters, learning rate ``lr * lr_factor(config, step)`` (step-wise schedule);
2. the concatenation weights of the dense layers become learnable at ``learnable_concat_from``
   (``set_learnable_concat(model, True)``);
3. after every optimiser step, ``update_lipschitz(model, n_iterations=power_iterations)``;
4. every ``test_every`` iterations (and after the last), a test on fresh samples, with solver
   statistics and the inverse round-trip error;
5. a checkpoint every ``checkpoint_every_s`` seconds and at the end, holding everything needed
   to resume bit for bit (model, optimiser, step, tests, timers, all random streams);
6. ``run.json`` (and the experiment's figure) when the run is finished.

Running :func:`train` again on the same folder resumes from the checkpoint, or returns the
finished record without training.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Union

import numpy as np
import torch
from torch import nn

from monoflow.blocks import solver_stats
from monoflow.checkpoint import (
    FolderLock,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from monoflow.experiments.config import (
    RegressionConfig,
    ToyConfig,
    config_to_dict,
    evaluation_iterations,
    lr_factor,
)
from monoflow.experiments.results import (
    CHECKPOINT_NAME,
    LOG_NAME,
    RUN_NAME,
    load_run,
    summarize_solver,
    to_jsonable,
    write_run,
)
from monoflow.lipschitz import certificates_record, set_learnable_concat, update_lipschitz
from monoflow.provenance import provenance
from monoflow.training import (LoopState, RunLog, check_same_config, config_changes, non_finite_parameters,
                               train_run)

__all__ = ["Experiment", "RunLog", "derived_seed", "make_optimizer", "non_finite_parameters", "run_record", "train",
           "training_step", "TIMED_PHASES", "RunState", "set_seeds", "test_log_line"]

Config = Union[ToyConfig, RegressionConfig]
#: Phases of one training iteration whose wall time is measured separately.
TIMED_PHASES = ("data", "forward", "backward", "optimizer")


class Experiment(Protocol):
    """What :func:`train` needs to know about an experiment."""

    config: Config
    #: Name of the test metric in run.json (``"nll_nats"``, ``"mse"``).
    metric_name: str

    def build_model(self) -> nn.Module:
        """A fresh model (called after the global seeds are set)."""

    def sample_batch(self, generator: torch.Generator, device: torch.device) -> Any:
        """One training batch drawn from ``generator``."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar training loss of ``batch``."""

    def evaluate(self, model: nn.Module, generator: torch.Generator, device: torch.device) -> Dict[str, Any]:
        """Test on fresh samples; must return ``{"metric": float, "roundtrip_max_abs_error": float, ...}``."""

    def finalize(self, model: nn.Module, run_dir: Path, generator: torch.Generator, device: torch.device) -> Dict[str, Any]:
        """Write the figure (and its data); return extra entries for run.json."""

    # Optional: ``random_streams() -> Dict[str, torch.Generator]``, generators of the experiment's
    # own that the checkpoint must save and restore (an ensemble's per-member streams), and
    # ``log_test(test)``, called after each test, ``record_members(state, device) -> Dict``,
    # called after ``finalize`` with the run's state, ``divergence_detail() -> str``, added to
    # the error when training diverges (an ensemble names the members that did),
    # ``compiled_update(model, optimizer)``, a callable that replaces Adam's step and the power
    # iterations (or None), and ``session_notes() -> Dict``, recorded with each session.


def derived_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for the named random stream of a run (independent streams per seed)."""
    entropy = [int(seed)] + [ord(character) for character in stream]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class RunState(LoopState):
    """Progress of a run, saved in its checkpoint: the loop's steps, wall time and sessions, plus
    the tests, their time and the phase timers."""

    tests: List[Dict[str, Any]] = field(default_factory=list)
    test_time_s: float = 0.0
    timers: Dict[str, float] = field(default_factory=lambda: {phase: 0.0 for phase in TIMED_PHASES})


#: Configuration fields that do not change a run's numbers: a resumed run may differ in them.
_RESULT_NEUTRAL_FIELDS = frozenset({"checkpoint_every_s"})


def _check_same_config(stored: Dict[str, Any], current: Dict[str, Any], where: Path) -> None:
    check_same_config(config_changes(to_jsonable(stored), to_jsonable(current), ignore=_RESULT_NEUTRAL_FIELDS),
                      where, "choose another output folder or delete that run")


def test_log_line(metric_name: str, test: Dict[str, Any]) -> str:
    """The train.log line of one test (``iteration``, ``metric``, ``train_loss``, round trip)."""
    return (f"test iteration {test['iteration']}: {metric_name}={test['metric']:.6f} "
            f"train_loss={test['train_loss']:.6f} roundtrip={test['roundtrip_max_abs_error']:.3e}")


def set_seeds(seed: int) -> None:
    """Seed the global torch, numpy and Python generators (model initialisation)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)



def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """Adam over all parameters with the configuration's learning rate and weight decay.

    ``foreach=True`` updates all parameter tensors with a few multi-tensor ops instead of a loop
    over them (the small models have ~100 tensors; the loop costs more than the arithmetic)."""
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)


def training_step(
    experiment: Experiment,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
    step: int,
    timers: Dict[str, float],
) -> torch.Tensor:
    """One iteration: set the learning rate of ``step``, draw a batch, forward, backward, Adam step,
    ``update_lipschitz(model, n_iterations=power_iterations)`` (the last two compiled when the
    experiment's ``compiled_update(model, optimizer)`` returns a callable). Adds the seconds of each phase
    (:data:`TIMED_PHASES`) to ``timers``; returns the (detached) loss. A non-finite loss is
    returned before any parameter changes."""
    config = experiment.config
    for group in optimizer.param_groups:
        group["lr"] = config.lr * lr_factor(config, step)

    tick = time.perf_counter()
    batch = experiment.sample_batch(generator, device)
    tock = time.perf_counter()
    timers["data"] += tock - tick

    loss = experiment.loss(model, batch)
    tick = time.perf_counter()
    timers["forward"] += tick - tock
    if not torch.isfinite(loss):
        return loss.detach()

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    tock = time.perf_counter()
    timers["backward"] += tock - tick

    compiled_update = getattr(experiment, "compiled_update", lambda *_: None)(model, optimizer)
    if compiled_update is not None:
        compiled_update()
    else:
        optimizer.step()
        update_lipschitz(model, n_iterations=config.power_iterations)
    timers["optimizer"] += time.perf_counter() - tock
    return loss.detach()


def train(
    experiment: Experiment,
    run_dir: Union[str, Path],
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    stop_after: Optional[int] = None,
) -> Dict[str, Any]:
    """Train, test and record ``experiment`` in ``run_dir``; resume or skip as the folder says
    (the loop is :func:`monoflow.training.train_run`, shared with the image flows).

    Args:
        experiment: the experiment (configuration, model, data, loss, test).
        run_dir: the run's folder (``run.json``, ``checkpoint.pt``, ``train.log``, figure).
        device: where the model and batches live; random streams stay on the CPU.
        progress: show a tqdm progress bar with the loss and solver iterations.
        stop_after: stop (with a checkpoint) once this many iterations are done in total; for
            tests of resumption and for splitting a long run. The run stays unfinished.

    Returns:
        The run record (the content of run.json) when finished, else
        ``{"status": "interrupted", "step": ..., "tests": [...], "signal": ...}`` (after
        ``stop_after`` iterations, or a SIGTERM / SIGINT, which saves a checkpoint first).

    Raises:
        RuntimeError: another process is training in ``run_dir`` (see
            :class:`~monoflow.checkpoint.FolderLock`), or training diverged.
    """
    return train_run(_ExperimentRun(experiment, Path(run_dir), torch.device(device)), progress=progress,
                     stop_after=stop_after)


def _finished_record(experiment: Experiment, run_dir: Path) -> Optional[Dict[str, Any]]:
    """The record of the finished run in ``run_dir`` (its configuration checked), else ``None``."""
    if (run_dir / RUN_NAME).is_file():
        record = load_run(run_dir)
        if record.get("status") == "finished":
            _check_same_config(record["config"], config_to_dict(experiment.config), run_dir)
            return record
    return None


class _ExperimentRun:
    """An :class:`Experiment` as a :class:`~monoflow.training.TrainingRun`: Adam with the step-wise
    schedule, tests every ``test_every`` iterations, a checkpoint every ``checkpoint_every_s``."""

    is_main = True

    def __init__(self, experiment: Experiment, run_dir: Path, device: torch.device) -> None:
        self.experiment, self.run_dir, self.device = experiment, run_dir, device
        self.config = experiment.config
        self.total_steps = self.config.iterations
        self.label = f"{self.config.experiment} {self.config.model}"
        self.log = RunLog(run_dir / LOG_NAME)
        self.log_path = run_dir / LOG_NAME
        self.state = RunState()
        self.tests_at = set(evaluation_iterations(self.config.iterations, self.config.test_every))
        self.learnable = False
        self.last_solver: Optional[Dict[str, Any]] = None

    def finished_record(self) -> Optional[Dict[str, Any]]:
        return _finished_record(self.experiment, self.run_dir)

    def lock(self) -> FolderLock:
        # the ensemble's member folders are written too (their own run folders)
        return FolderLock(self.run_dir, *getattr(self.experiment, "member_dirs", ()))

    def prepare(self) -> None:
        config, experiment = self.config, self.experiment
        self.data_generator = torch.Generator().manual_seed(derived_seed(config.seed, "train"))
        self.test_generator = torch.Generator().manual_seed(derived_seed(config.seed, "test"))
        self.figure_generator = torch.Generator().manual_seed(derived_seed(config.seed, "figure"))
        self.streams = {"data": self.data_generator, "test": self.test_generator, "figure": self.figure_generator}
        self.streams.update(getattr(experiment, "random_streams", dict)())
        set_seeds(config.seed)
        self.model = experiment.build_model().to(self.device)
        self.optimizer = make_optimizer(self.model, config)
        checkpoint_path = self.run_dir / CHECKPOINT_NAME
        if checkpoint_path.is_file():
            checkpoint = load_checkpoint(checkpoint_path, required=("config", "model", "optimizer", "state", "rng"))
            _check_same_config(checkpoint["config"], config_to_dict(config), self.run_dir)
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.state = RunState(**checkpoint["state"])
            restore_rng_state(checkpoint["rng"], **self.streams)
            self.log(f"resumed from {checkpoint_path.name} at iteration {self.state.step}")
        else:
            self.log(f"start {config.experiment} {config_to_dict(config)}")
        self.learnable = self.state.step >= config.learnable_concat_from
        set_learnable_concat(self.model, self.learnable)

    def session_notes(self) -> Dict[str, Any]:
        return {"provenance": provenance(self.device), **getattr(self.experiment, "session_notes", dict)()}

    def train_step(self, step: int) -> torch.Tensor:
        self.model.train()
        if not self.learnable and step >= self.config.learnable_concat_from:
            self.learnable = True
            set_learnable_concat(self.model, True)
            self.log(f"learnable concatenation on at iteration {step}")
        return training_step(self.experiment, self.model, self.optimizer, self.data_generator, self.device, step,
                             self.state.timers)

    def after_step(self, loss: torch.Tensor) -> Optional[Dict[str, Any]]:
        step = self.state.step
        self.last_solver = None
        if step in self.tests_at or step % 10 == 0 or step == 1:
            self.last_solver = summarize_solver(solver_stats(self.model), kinds=("forward", "adjoint"))
            return {"loss": f"{loss.item():.4f}", "solver_iters": self.last_solver.get("forward_iterations_mean", "-")}
        return None

    def evaluation_due(self, step: int) -> bool:
        return step in self.tests_at

    def evaluate(self, loss: torch.Tensor) -> None:
        tick = time.perf_counter()
        self.model.eval()
        result = self.experiment.evaluate(self.model, self.test_generator, self.device)
        result = {"iteration": self.state.step, "train_loss": float(loss.item()),
                  "lr": self.optimizer.param_groups[0]["lr"], **result, "train_solver": self.last_solver}
        self.state.tests.append(to_jsonable(result))
        if hasattr(self.experiment, "log_test"):
            self.experiment.log_test(self.state.tests[-1])
        self.state.test_time_s += time.perf_counter() - tick
        self.log(test_log_line(self.experiment.metric_name, result))

    def checkpoint_due(self, step: int, seconds_since_save: float) -> bool:
        return seconds_since_save >= self.config.checkpoint_every_s

    def save(self, finished: bool) -> None:
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, {
            "config": config_to_dict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": dataclasses.asdict(self.state),
            "rng": capture_rng_state(**self.streams),
        })

    def interrupted(self, reason: Dict[str, Any]) -> Dict[str, Any]:
        return {"status": "interrupted", "step": self.state.step, "tests": self.state.tests,
                "run_dir": str(self.run_dir), "signal": reason["signal"]}

    def divergence_detail(self) -> str:
        return self.experiment.divergence_detail() if hasattr(self.experiment, "divergence_detail") else ""

    def finish(self, stopped_by_time_budget: bool) -> Dict[str, Any]:
        experiment, model = self.experiment, self.model
        model.eval()
        extra = experiment.finalize(model, self.run_dir, self.figure_generator, self.device)
        if hasattr(experiment, "record_members"):
            extra["members"] = experiment.record_members(self.state, self.device)
        record = run_record(experiment, model, self.state, self.device, extra)
        write_run(self.run_dir, record)
        record["run_dir"] = str(self.run_dir)
        self.log(f"finished: {experiment.metric_name}={record['final_metric']:.6f} "
                 f"wall_time={record['timing']['wall_time_s']:.1f}s")
        return record


def run_record(
    experiment: Experiment, model: nn.Module, state: RunState, device: torch.device, extra: Dict[str, Any]
) -> Dict[str, Any]:
    """The content of run.json: metric (mean of the last ``report_last`` tests), test curve,
    configuration, parameter count, provenance and timing, plus ``extra``."""
    config = experiment.config
    used = state.tests[-config.report_last :]
    final = float(np.mean([test["metric"] for test in used]))
    steps = max(state.step, 1)
    train_time = sum(state.timers.values())
    return to_jsonable(
        {
            "experiment": config.experiment,
            "status": "finished",
            "preset": config.preset,
            "model": config.model,
            "dataset": getattr(config, "dataset", None),
            "seed": config.seed,
            "metric_name": experiment.metric_name,
            "final_metric": final,
            "final_metric_definition": f"mean of the last {len(used)} tests (iterations "
            f"{used[0]['iteration']}..{used[-1]['iteration']})",
            "tests": state.tests,
            "config": config_to_dict(config),
            "parameters": sum(p.numel() for p in model.parameters()),
            "provenance": provenance(device),
            # a run resumed across sessions may span commits and machines: each one is listed
            "sessions": state.sessions,
            "timing": {
                "wall_time_s": state.elapsed_s,
                "iterations": state.step,
                "per_iteration_s": train_time / steps,
                "per_iteration_breakdown_s": {phase: state.timers[phase] / steps for phase in TIMED_PHASES},
                "test_time_s": state.test_time_s,
                "phases": {
                    "data": "sampling the batch",
                    "forward": "forward pass: fixed-point solves and log-determinant, loss",
                    "backward": "backward pass: adjoint solves and parameter gradients",
                    "optimizer": "Adam step and power iterations of the spectral norms",
                },
            },
            "solver": state.tests[-1].get("solver") if state.tests else None,
            "lipschitz": certificates_record(model),
            **extra,
        }
    )

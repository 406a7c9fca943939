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

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from monoflow.blocks import solver_stats
from monoflow.checkpoint import (
    FolderLock,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    stop_on_signals,
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


class RunLog:
    """Appends timestamped lines to the run's log file (and nothing else: no global logger)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {message}\n")


@dataclass
class RunState:
    """Progress of a run, saved in its checkpoint: steps, tests, wall time and phase timers."""

    step: int = 0
    tests: List[Dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0
    test_time_s: float = 0.0
    timers: Dict[str, float] = field(default_factory=lambda: {phase: 0.0 for phase in TIMED_PHASES})
    #: One entry per start or resumption: the iteration it began at, its commit, device, time.
    sessions: List[Dict[str, Any]] = field(default_factory=list)


#: Configuration fields that do not change a run's numbers: a resumed run may differ in them.
_RESULT_NEUTRAL_FIELDS = frozenset({"checkpoint_every_s"})


def _config_differences(stored: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    keys = sorted((set(stored) | set(current)) - _RESULT_NEUTRAL_FIELDS)
    return [f"{key}: {stored.get(key)!r} -> {current.get(key)!r}" for key in keys if stored.get(key) != current.get(key)]


def _check_same_config(stored: Dict[str, Any], current: Dict[str, Any], where: Path) -> None:
    differences = _config_differences(to_jsonable(stored), to_jsonable(current))
    if differences:
        raise ValueError(
            f"{where} holds a run with a different configuration ({'; '.join(differences)}); "
            "choose another output folder or delete that run"
        )


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


def non_finite_parameters(model: nn.Module) -> List[str]:
    """Names of the parameters with a nan or inf entry."""
    return [name for name, parameter in model.named_parameters() if not bool(torch.isfinite(parameter).all())]


def _diverged(experiment: Experiment, log: "RunLog", run_dir: Path, message: str,
              cause: Optional[BaseException] = None) -> None:
    """Log and raise the divergence (with the experiment's own detail, e.g. an ensemble's members)."""
    if hasattr(experiment, "divergence_detail"):
        message += f"; {experiment.divergence_detail()}"
    log(f"diverged: {message}")
    raise RuntimeError(f"training diverged ({message}); see {run_dir / LOG_NAME}") from cause


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
    """Train, test and record ``experiment`` in ``run_dir``; resume or skip as the folder says.

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
            :class:`~monoflow.checkpoint.FolderLock`).
    """
    if stop_after is not None and stop_after < 0:
        raise ValueError(f"stop_after must be >= 0 iterations, got {stop_after}")
    # the ensemble's member folders are written too (their own run folders)
    folders = [Path(run_dir), *getattr(experiment, "member_dirs", ())]
    # a finished run is only read, so it needs no lock (its folder may be read-only)
    finished = _finished_record(experiment, Path(run_dir))
    if finished is not None:
        return finished
    with FolderLock(*folders):
        return _train(experiment, Path(run_dir), torch.device(device), progress, stop_after)


def _finished_record(experiment: Experiment, run_dir: Path) -> Optional[Dict[str, Any]]:
    """The record of the finished run in ``run_dir`` (its configuration checked), else ``None``."""
    if (run_dir / RUN_NAME).is_file():
        record = load_run(run_dir)
        if record.get("status") == "finished":
            _check_same_config(record["config"], config_to_dict(experiment.config), run_dir)
            return record
    return None


def _train(experiment: Experiment, run_dir: Path, device: torch.device, progress: bool,
           stop_after: Optional[int]) -> Dict[str, Any]:
    """:func:`train` with its folders locked."""
    config = experiment.config
    config_dict = config_to_dict(config)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    log = RunLog(run_dir / LOG_NAME)

    finished = _finished_record(experiment, run_dir)  # finished meanwhile by another process
    if finished is not None:
        return finished

    data_generator = torch.Generator().manual_seed(derived_seed(config.seed, "train"))
    test_generator = torch.Generator().manual_seed(derived_seed(config.seed, "test"))
    figure_generator = torch.Generator().manual_seed(derived_seed(config.seed, "figure"))
    streams = {"data": data_generator, "test": test_generator, "figure": figure_generator}
    streams.update(getattr(experiment, "random_streams", dict)())

    set_seeds(config.seed)
    model = experiment.build_model().to(device)
    optimizer = make_optimizer(model, config)
    state = RunState()

    if checkpoint_path.is_file():
        checkpoint = load_checkpoint(checkpoint_path, required=("config", "model", "optimizer", "state", "rng"))
        _check_same_config(checkpoint["config"], config_dict, run_dir)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = RunState(**checkpoint["state"])
        restore_rng_state(checkpoint["rng"], **streams)
        log(f"resumed from {checkpoint_path.name} at iteration {state.step}")
    else:
        log(f"start {config.experiment} {config_dict}")
    session = provenance(device)
    notes = getattr(experiment, "session_notes", dict)()
    state.sessions.append({"iteration": state.step, **{key: session[key] for key in
                                                       ("git_commit", "device", "created", "command")}, **notes})
    log(f"session at iteration {state.step}: commit {session['git_commit']}, {session['device']}"
        + "".join(f", {key.replace('_', ' ')}: {value}" for key, value in notes.items()))

    def save() -> None:
        save_checkpoint(
            checkpoint_path,
            {
                "config": config_dict,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": {
                    "step": state.step,
                    "tests": state.tests,
                    "elapsed_s": state.elapsed_s,
                    "test_time_s": state.test_time_s,
                    "timers": dict(state.timers),
                    "sessions": state.sessions,
                },
                "rng": capture_rng_state(**streams),
            },
        )

    tests_at = set(evaluation_iterations(config.iterations, config.test_every))
    learnable = state.step >= config.learnable_concat_from
    set_learnable_concat(model, learnable)
    session_start = time.perf_counter()
    elapsed_at_start = state.elapsed_s
    last_save = session_start
    bar = tqdm(
        total=config.iterations,
        initial=state.step,
        disable=not progress,
        desc=f"{config.experiment} {config.model}",
        dynamic_ncols=True,
    )
    with stop_on_signals() as stop:
        try:
            while state.step < config.iterations:
                if (stop_after is not None and state.step >= stop_after) or stop.requested:
                    state.elapsed_s = elapsed_at_start + time.perf_counter() - session_start
                    save()
                    reason = f"signal {stop.signal}" if stop.requested else f"stop_after={stop_after}"
                    log(f"stopped at iteration {state.step} ({reason}); rerun the same command to resume")
                    return {"status": "interrupted", "step": state.step, "tests": state.tests, "run_dir": str(run_dir),
                            "signal": stop.signal}

                model.train()
                if not learnable and state.step >= config.learnable_concat_from:
                    learnable = True
                    set_learnable_concat(model, True)
                    log(f"learnable concatenation on at iteration {state.step}")
                try:
                    loss = training_step(experiment, model, optimizer, data_generator, device, state.step, state.timers)
                except Exception as error:  # non-finite parameters surface as solver or input errors
                    broken = non_finite_parameters(model)
                    if not broken:
                        raise
                    _diverged(experiment, log, run_dir, f"non-finite parameters ({', '.join(broken[:3])}"
                              f"{', ...' if len(broken) > 3 else ''}) at iteration {state.step + 1}", error)
                if not torch.isfinite(loss):
                    _diverged(experiment, log, run_dir, f"loss {loss.item()} at iteration {state.step + 1}")
                state.step += 1

                train_solver = None
                if state.step in tests_at or state.step % 10 == 0 or state.step == 1:
                    train_solver = summarize_solver(solver_stats(model), kinds=("forward", "adjoint"))
                    bar.set_postfix(loss=f"{loss.item():.4f}", solver_iters=train_solver.get("forward_iterations_mean", "-"))
                bar.update(1)

                if state.step in tests_at:
                    tick = time.perf_counter()
                    model.eval()
                    result = experiment.evaluate(model, test_generator, device)
                    result = {
                        "iteration": state.step,
                        "train_loss": float(loss.item()),
                        "lr": optimizer.param_groups[0]["lr"],
                        **result,
                        "train_solver": train_solver,
                    }
                    state.tests.append(to_jsonable(result))
                    if hasattr(experiment, "log_test"):
                        experiment.log_test(state.tests[-1])
                    state.test_time_s += time.perf_counter() - tick
                    log(test_log_line(experiment.metric_name, result))

                if time.perf_counter() - last_save >= config.checkpoint_every_s:
                    state.elapsed_s = elapsed_at_start + time.perf_counter() - session_start
                    save()
                    last_save = time.perf_counter()
        finally:
            bar.close()

    state.elapsed_s = elapsed_at_start + time.perf_counter() - session_start
    save()
    model.eval()
    extra = experiment.finalize(model, run_dir, figure_generator, device)
    if hasattr(experiment, "record_members"):
        extra["members"] = experiment.record_members(state, device)
    record = run_record(experiment, model, state, device, extra)
    write_run(run_dir, record)
    record["run_dir"] = str(run_dir)
    log(f"finished: {experiment.metric_name}={record['final_metric']:.6f} wall_time={record['timing']['wall_time_s']:.1f}s")
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

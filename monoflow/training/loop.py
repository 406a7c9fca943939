"""The one training loop of monoflow: toy densities, 1-D regression and image flows alike.

A run (:class:`TrainingRun`) says what differs between experiments: how to build or restore the
model, what one optimiser step is, what to log, when and how to evaluate, what its checkpoint
holds and what its record says. :func:`train_run` does what is the same for all of them:

1. a finished run is returned as recorded, without training and without a lock;
2. the run's folders are locked (:class:`~monoflow.checkpoint.FolderLock`): a second process
   started on the same run stops with :class:`~monoflow.checkpoint.FolderBusyError`;
3. the run is prepared (fresh, or resumed from its checkpoint after checking that the
   configuration is the same, :func:`~monoflow.training.configs.check_same_config`), and each
   start or resumption is recorded as a *session* (step, commit, device, time);
4. steps until ``total_steps``, with a tqdm progress bar, the run's evaluation schedule and
   checkpoint cadence; a non-finite loss or parameter stops the run with an error that says so;
5. SIGTERM / SIGINT, ``stop_after`` steps or a ``max_seconds`` budget stop cleanly with a
   checkpoint; rerunning the same command resumes from it;
6. at the end, a last checkpoint and the run's record.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional, Protocol

import torch
from tqdm.auto import tqdm

from monoflow.allocator import retain_freed_memory
from monoflow.checkpoint import stop_on_signals

__all__ = ["RunLog", "LoopState", "TrainingRun", "train_run", "session_entry", "non_finite_parameters", "TrainingDiverged"]


class RunLog:
    """Appends timestamped lines to a run's log file (and nothing else: no global logger)."""

    def __init__(self, path: Path, echo: bool = False) -> None:
        self.path, self.echo = Path(path), echo

    def __call__(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {message}\n")
        if self.echo:
            print(message)


@dataclass
class LoopState:
    """What the loop itself keeps in every checkpoint: optimiser steps done, wall time of the
    training sessions, and one entry per start or resumption (:func:`session_entry`)."""

    step: int = 0
    elapsed_s: float = 0.0
    sessions: List[Dict[str, Any]] = field(default_factory=list)


class TrainingDiverged(RuntimeError):
    """The loss or a parameter became nan or inf."""


class TrainingRun(Protocol):
    """What :func:`train_run` needs to know about one run."""

    #: The run's progress (a :class:`LoopState` or a subclass with the run's own fields).
    state: LoopState
    #: Optimiser steps of the whole run; progress-bar label; whether this process writes files and
    #: shows progress (rank 0 of a data-parallel job, or the only process).
    total_steps: int
    label: str
    is_main: bool
    model: torch.nn.Module

    def finished_record(self) -> Optional[Dict[str, Any]]:
        """The record of the finished run (its configuration checked), else ``None``."""

    def lock(self) -> ContextManager[Any]:
        """Exclusive use of the run's folders while it trains."""

    def prepare(self) -> None:
        """Build the model, optimiser and data, then restore them (and ``state``) from the
        checkpoint if there is one, refusing a checkpoint of another configuration."""

    def session_notes(self) -> Dict[str, Any]:
        """Entries of this session's record: its provenance and how it computes."""

    def log(self, message: str) -> None:
        """Write a line of the run's log."""

    def train_step(self, step: int) -> torch.Tensor:
        """Optimiser step number ``step + 1``: the (detached) training loss; a non-finite loss
        must be returned before any parameter changes."""

    def after_step(self, loss: torch.Tensor) -> Optional[Dict[str, Any]]:
        """Bookkeeping after ``state.step`` was advanced; returns a progress-bar postfix or ``None``."""

    def evaluation_due(self, step: int) -> bool: ...

    def evaluate(self, loss: torch.Tensor) -> None:
        """Evaluate the model at ``state.step`` and keep the result in ``state``."""

    def checkpoint_due(self, step: int, seconds_since_save: float) -> bool: ...

    def save(self, finished: bool) -> None:
        """Write the checkpoint (``state`` included)."""

    def interrupted(self, reason: Dict[str, Any]) -> Dict[str, Any]:
        """The value :func:`train_run` returns for a run stopped early (``reason`` holds
        ``status``, ``step``, ``run_dir``, ``signal``)."""

    def finish(self, stopped_by_time_budget: bool) -> Dict[str, Any]:
        """Evaluate, write and return the run's record."""

    # Optional: ``divergence_detail() -> str``, added to the error when training diverges.


def non_finite_parameters(model: torch.nn.Module) -> List[str]:
    """Names of the parameters with a nan or inf entry."""
    return [name for name, parameter in model.named_parameters() if not bool(torch.isfinite(parameter).all())]


def session_entry(provenance: Dict[str, Any], step: int, notes: Dict[str, Any]) -> Dict[str, Any]:
    """One entry of a run's ``sessions``: where it (re)started, on which commit, device, CPU kernels
    and allocator (they change CPU timings) and time."""
    return {"iteration": step, **{key: provenance[key] for key in ("git_commit", "device", "cpu_kernels", "cpu_allocator",
                                                                   "created", "command") if key in provenance}, **notes}


def train_run(run: TrainingRun, progress: bool = True, stop_after: Optional[int] = None,
              max_seconds: Optional[float] = None) -> Dict[str, Any]:
    """Train ``run`` to its end, or resume it, or return its record if it is finished.

    Args:
        run: the run (see :class:`TrainingRun`).
        progress: show a tqdm progress bar (on the main process).
        stop_after: stop with a checkpoint once this many steps are done in total (the run stays
            unfinished; for tests of resumption and for splitting a long run).
        max_seconds: a time budget for this call: stop training after it and finish the run with
            what is trained (its record says ``stopped_by_time_budget``).

    Returns:
        The run's record when finished; else ``run.interrupted(...)`` (``status: "interrupted"``).
    """
    if stop_after is not None and stop_after < 0:
        raise ValueError(f"stop_after must be >= 0 steps, got {stop_after}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    finished = run.finished_record()  # a finished run is only read: no lock (its folder may be read-only)
    if finished is not None:
        return finished
    with run.lock():
        finished = run.finished_record()  # finished meanwhile by another process
        if finished is not None:
            return finished
        retain_freed_memory()  # CPU steps reuse their freed tensors instead of mapping them afresh
        run.prepare()
        notes = run.session_notes()
        run.state.sessions.append(session_entry(notes.pop("provenance"), run.state.step, notes))
        session = run.state.sessions[-1]
        run.log(f"session at iteration {run.state.step}: commit {session['git_commit']}, {session['device']}"
                + "".join(f", {key.replace('_', ' ')}: {value}" for key, value in notes.items()))
        stopped = _steps(run, progress, stop_after, max_seconds)
        if stopped is not None and stopped.get("status") == "interrupted":
            return run.interrupted(stopped)
        run.save(finished=stopped is None)
        return run.finish(stopped_by_time_budget=stopped is not None)


def _steps(run: TrainingRun, progress: bool, stop_after: Optional[int],
           max_seconds: Optional[float]) -> Optional[Dict[str, Any]]:
    """The steps of one session; ``None`` when all are done, else why they stopped."""
    state = run.state
    start = time.perf_counter()
    elapsed_before = state.elapsed_s
    last_save = start
    bar = tqdm(total=run.total_steps, initial=state.step, disable=not (progress and run.is_main),
               desc=run.label, dynamic_ncols=True)
    stopped = None
    with stop_on_signals() as stop, contextlib.closing(bar):
        while state.step < run.total_steps:
            if stop.requested or (stop_after is not None and state.step >= stop_after):
                state.elapsed_s = elapsed_before + time.perf_counter() - start
                run.save(finished=False)
                reason = f"signal {stop.signal}" if stop.requested else f"stop_after={stop_after}"
                run.log(f"stopped at iteration {state.step} ({reason}); rerun the same command to resume")
                return {"status": "interrupted", "preempted": True, "step": state.step, "signal": stop.signal}
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                stopped = {"status": "time budget"}
                break
            loss = _checked_step(run)
            state.step += 1
            postfix = run.after_step(loss)
            if postfix is not None:
                bar.set_postfix(postfix)
            bar.update(1)
            if run.evaluation_due(state.step):
                run.evaluate(loss)
            state.elapsed_s = elapsed_before + time.perf_counter() - start
            if run.checkpoint_due(state.step, time.perf_counter() - last_save):
                run.save(finished=False)
                last_save = time.perf_counter()
    state.elapsed_s = elapsed_before + time.perf_counter() - start
    return stopped


def _checked_step(run: TrainingRun) -> torch.Tensor:
    """``run.train_step``, stopping with :class:`TrainingDiverged` on a non-finite loss, or on an
    error raised by non-finite parameters (they surface as solver or input errors)."""
    step = run.state.step
    try:
        loss = run.train_step(step)
    except Exception as error:
        broken = non_finite_parameters(run.model)
        if not broken:
            raise
        _diverged(run, f"non-finite parameters ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}) "
                       f"at iteration {step + 1}", error)
    if not torch.isfinite(loss):
        _diverged(run, f"loss {loss.item()} at iteration {step + 1}")
    return loss


def _diverged(run: TrainingRun, message: str, cause: Optional[BaseException] = None) -> None:
    """Log and raise the divergence (with the run's own detail, e.g. an ensemble's members)."""
    detail = run.divergence_detail() if hasattr(run, "divergence_detail") else ""
    if detail:
        message += f"; {detail}"
    run.log(f"diverged: {message}")
    where = getattr(run, "log_path", None)
    raise TrainingDiverged(f"training diverged ({message})" + (f"; see {where}" if where else "")) from cause

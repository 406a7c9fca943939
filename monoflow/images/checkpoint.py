r"""Checkpoints that let a multi-day run survive preemption.

``checkpoint.pt`` (written by rank 0) holds the model, the EMA weights, the optimiser, the
learning-rate scheduler, the step and the training log; ``rng_rank<r>.pt`` (one per rank) holds
that rank's Python, NumPy, torch and CUDA random states. Files are written to a temporary name
and renamed, so a kill during a save leaves the previous checkpoint intact. Rerunning the same
command finds them and resumes. Writing, reading (``weights_only=True``: loading never runs code
from the file) and the random states are :mod:`monoflow.checkpoint`'s.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from monoflow.checkpoint import load_checkpoint as _load_file
from monoflow.training.configs import check_same_config, config_changes

__all__ = ["checkpoint_path", "rng_path", "load_checkpoint", "load_rng_state", "REQUIRED_KEYS",
           "OPERATIONAL_KEYS", "config_changes", "check_same_run", "read_record"]

#: Keys every image checkpoint has; a file without them is not one.
REQUIRED_KEYS = ("preset", "model_name", "model_config", "training_config", "model", "ema", "optimizer",
                 "scheduler", "step")


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoint.pt"


def rng_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"rng_rank{rank}.pt"


def load_checkpoint(run_dir: Path, map_location: Any = "cpu") -> Optional[Dict[str, Any]]:
    """The checkpoint of ``run_dir`` or ``None`` if there is none.

    Raises:
        monoflow.checkpoint.CheckpointError: the file is damaged, not an image checkpoint, or holds
            anything but tensors and plain containers (the message names it)."""
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    return _load_file(path, map_location=map_location, required=REQUIRED_KEYS)


def load_rng_state(run_dir: Path, rank: int) -> Optional[Dict[str, Any]]:
    """The random-number state of ``rank`` saved in ``run_dir``, or ``None`` if there is none."""
    path = rng_path(run_dir, rank)
    if not path.exists():
        return None
    return _load_file(path, required=("torch", "numpy", "python"))


#: Settings a resumed run may change: how often it logs, evaluates and saves, how it evaluates,
#: and how long it trains (``iterations`` / ``epochs``: extending a run).
OPERATIONAL_KEYS = frozenset({"eval_every", "checkpoint_every", "log_every", "n_eval_draws", "eval_batch_size",
                              "n_samples", "eval_curve_images", "iterations", "epochs"})


def check_same_run(state: Dict[str, Any], model_config: Any, training_config: Any, run_dir: Path) -> None:
    """Refuse to resume the checkpoint ``state`` with other settings than it was trained with
    (as toy runs do); only :data:`OPERATIONAL_KEYS` may change."""
    changes = [f"model {change}" for change in config_changes(
        state["model_config"], dataclasses.asdict(model_config), type(model_config))]
    changes += [f"training {change}" for change in config_changes(
        state["training_config"], dataclasses.asdict(training_config), type(training_config), OPERATIONAL_KEYS)]
    check_same_config(changes, run_dir, "resume it with the settings it was started with, choose another "
                      "--output / --seed, or delete that run")


def read_record(path: Path) -> Dict[str, Any]:
    """The ``run.json`` at ``path``; ``ValueError`` naming the file if it is not a JSON object."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a valid run record ({error}); delete it and rerun the command to "
                         "evaluate the finished checkpoint again") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a run record (a JSON {type(record).__name__}); delete it and rerun")
    return record

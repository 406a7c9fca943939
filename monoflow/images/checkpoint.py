r"""Checkpoints that let a multi-day run survive preemption.

``checkpoint.pt`` (written by rank 0) holds the model, the EMA weights, the optimiser, the
learning-rate scheduler, the step and the training log; ``rng_rank<r>.pt`` (one per rank) holds
that rank's Python, NumPy, torch and CUDA random states. Files are written to a temporary name
and renamed, so a kill during a save leaves the previous checkpoint intact. Rerunning the same
command finds them and resumes.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["save_atomic", "rng_state", "set_rng_state", "checkpoint_path", "rng_path", "load_checkpoint"]


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoint.pt"


def rng_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"rng_rank{rank}.pt"


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(run_dir: Path, map_location: Any = "cpu") -> Optional[Dict[str, Any]]:
    """The checkpoint of ``run_dir`` or ``None`` if there is none."""
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    return torch.load(path, map_location=map_location, weights_only=False)

r"""Checkpoints that let a multi-day run survive preemption.

``checkpoint.pt`` (written by rank 0) holds the model, the EMA weights, the optimiser, the
learning-rate scheduler, the step and the training log; ``rng_rank<r>.pt`` (one per rank) holds
that rank's Python, NumPy, torch and CUDA random states. Files are written to a temporary name
and renamed, so a kill during a save leaves the previous checkpoint intact. Rerunning the same
command finds them and resumes. Writing and the random states are :mod:`monoflow.checkpoint`'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

__all__ = ["checkpoint_path", "rng_path", "load_checkpoint"]


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoint.pt"


def rng_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"rng_rank{rank}.pt"


def load_checkpoint(run_dir: Path, map_location: Any = "cpu") -> Optional[Dict[str, Any]]:
    """The checkpoint of ``run_dir`` or ``None`` if there is none."""
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    return torch.load(path, map_location=map_location, weights_only=False)

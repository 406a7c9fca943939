"""Run records (``run.json``) with provenance, and the Table 2 view of a results folder.

Layout (docs/DESIGN.md): ``results/images/<preset>/<model>/seed<k>/run.json`` and
``samples.png`` beside it; checkpoints (``*.pt``) live there too and are never committed.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from monoflow.checkpoint import atomic_write_text
from monoflow.images.checkpoint import read_record
from monoflow.provenance import provenance as base_provenance

__all__ = ["provenance", "write_json", "read_runs", "image_table", "run_directory", "seconds_per_step"]

PathLike = Union[str, os.PathLike]


def run_directory(results_dir: PathLike, preset: str, model: str, seed: int) -> Path:
    return Path(results_dir) / preset / model / f"seed{seed}"


def provenance(device: torch.device, world_size: int = 1) -> Dict[str, Any]:
    """Where and with what a run was made (:func:`monoflow.provenance.provenance`), plus the
    process count and the precision policy of the solves."""
    info = base_provenance(
        device,
        hostname=socket.gethostname(),
        world_size=world_size,
        tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
        tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    return info


def write_json(data: Dict[str, Any], path: PathLike) -> Path:
    """Write ``data`` as JSON to ``path`` atomically; returns the path."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str))
    return Path(path)


def read_runs(results_dir: PathLike) -> List[Dict[str, Any]]:
    """Every image ``run.json`` below ``results_dir`` (with its folder under ``_dir``); a record that
    is not a JSON object (corrupt, empty) is a ``ValueError`` naming its file."""
    runs = []
    for path in sorted(Path(results_dir).rglob("run.json")):
        data = read_record(path)
        if data.get("kind") == "images":
            data["_dir"] = str(path.parent)
            runs.append(data)
    return runs


def seconds_per_step(run: dict, warmup_entries: int = 1) -> Optional[float]:
    """Median seconds per optimiser step over the logged windows after the first ``warmup_entries``
    (images per step = global batch x accumulation steps, so accumulation is counted)."""
    training = run.get("training_config", {})
    images_per_step = training.get("batch_size", 0) * training.get("accumulation_steps", 1)
    rates = [e["images_per_s"] for e in run.get("train_log", [])[warmup_entries:] if e.get("images_per_s")]
    if not rates or not images_per_step:
        return None
    return images_per_step / statistics.median(rates)


def image_table(results_dir: PathLike = "results/images"):
    """One row per image run: our numbers next to the paper's (a pandas DataFrame).

    Columns: preset, model, data, scale, bpd_test, bpd_std, accuracy, params, paper_bpd,
    paper_params, iterations, wall_time_s, device, samples (path of the sample grid or None).
    """
    import pandas as pd

    columns = ["preset", "model", "data", "scale", "bpd_test", "bpd_std", "accuracy", "params", "paper_bpd",
               "paper_params", "iterations", "wall_time_s", "device", "samples"]
    rows = []
    for run in read_runs(results_dir):
        metrics = run.get("metrics", {})
        samples = run.get("samples")
        rows.append({
            "preset": run["preset"],
            "model": run["model"],
            "data": run["dataset"],
            "scale": run.get("scale"),
            "bpd_test": metrics.get("bpd_test"),
            "bpd_std": metrics.get("bpd_std"),
            "accuracy": metrics.get("accuracy"),
            "params": run.get("params"),
            "paper_bpd": run.get("paper_bpd"),
            "paper_params": run.get("paper_params"),
            "iterations": run.get("iterations"),
            "wall_time_s": run.get("wall_time_s"),
            "device": run.get("provenance", {}).get("device"),
            "samples": str(Path(run["_dir"]) / samples) if samples else None,
        })
    return pd.DataFrame(rows, columns=columns)

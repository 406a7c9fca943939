"""Models back from checkpoints: re-test them on fresh data and draw samples.

A checkpoint (``checkpoint.pt`` beside ``run.json``) holds the run's configuration, so the model
is rebuilt without any other input:

>>> model, config = load_model("results/toy2d/quick/monotone/moons/seed0")  # doctest: +SKIP
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from monoflow.checkpoint import load_checkpoint
from monoflow.experiments.config import RegressionConfig, ToyConfig, config_from_dict
from monoflow.experiments.results import CHECKPOINT_NAME

__all__ = ["resolve_checkpoint", "load_model", "evaluate_checkpoint", "sample_checkpoint"]

PathLike = Union[str, os.PathLike]


def resolve_checkpoint(path: PathLike) -> Path:
    """``path`` itself if it is a file, else ``path/checkpoint.pt``; ``FileNotFoundError`` if absent."""
    path = Path(path)
    candidate = path / CHECKPOINT_NAME if path.is_dir() else path
    if not candidate.is_file():
        raise FileNotFoundError(f"no checkpoint at {candidate} (give a run folder or a checkpoint.pt file)")
    return candidate


def load_model(
    path: PathLike, device: Union[str, torch.device] = "cpu"
) -> Tuple[nn.Module, Union[ToyConfig, RegressionConfig]]:
    """The trained model (in eval mode) and its configuration from a run folder or checkpoint."""
    checkpoint = load_checkpoint(resolve_checkpoint(path))
    config = config_from_dict(checkpoint["config"])
    if isinstance(config, ToyConfig):
        from monoflow.experiments.toy2d import build_toy_model as build
    else:
        from monoflow.experiments.regression1d import build_regression_model as build
    model = build(config)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), config


def evaluate_checkpoint(
    path: PathLike,
    samples: Optional[int] = None,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
) -> Dict[str, Any]:
    """Recompute the test metric of a checkpoint on fresh data drawn with ``seed``.

    ``samples`` defaults to the run's ``test_samples``. Returns the experiment, the metric name and
    value, the inverse round-trip error, the solver statistics and the iteration of the checkpoint.
    """
    from dataclasses import replace

    model, config = load_model(path, device)
    if samples is not None:
        if samples < 1:
            raise ValueError(f"samples must be positive, got {samples}")
        config = replace(config, test_samples=int(samples))
    generator = torch.Generator().manual_seed(int(seed))
    if isinstance(config, ToyConfig):
        from monoflow.experiments.toy2d import toy_test as test

        metric_name = "nll_nats"
    else:
        from monoflow.experiments.regression1d import regression_test as test

        metric_name = "mse"
    result = test(model, config, generator, device)
    step = load_checkpoint(resolve_checkpoint(path))["state"]["step"]
    return {
        "experiment": config.experiment,
        "checkpoint": str(resolve_checkpoint(path)),
        "iteration": step,
        "metric_name": metric_name,
        "samples": config.test_samples,
        "seed": seed,
        **result,
    }


def sample_checkpoint(
    path: PathLike, n: int, seed: int = 0, device: Union[str, torch.device] = "cpu"
) -> np.ndarray:
    """``n`` samples of a 2-D model (inverse flow of standard normal draws seeded by ``seed``)."""
    if n < 1:
        raise ValueError(f"number of samples must be positive, got {n}")
    model, config = load_model(path, device)
    if not isinstance(config, ToyConfig):
        raise ValueError(
            f"sampling needs a 2-D density model (toy2d checkpoint); {path} is a {config.experiment} run"
        )
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        return model.sample(int(n), generator=generator).cpu().numpy()

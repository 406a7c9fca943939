"""Models back from checkpoints: re-test them on fresh data and draw samples.

A checkpoint (``checkpoint.pt`` beside ``run.json``) holds the run's configuration, so the model
is rebuilt without any other input:

>>> model, config = load_model("results/toy2d/quick/monotone/moons/seed0")  # doctest: +SKIP

The checkpoint of runs trained together (``results/ensembles/...``) evaluates every member, so an
unfinished ensemble can be checked while it trains.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from monoflow.checkpoint import load_checkpoint
from monoflow.experiments.config import RegressionConfig, ToyConfig, ToyEnsembleConfig, config_from_dict
from monoflow.experiments.results import CHECKPOINT_NAME
from monoflow.lipschitz import set_learnable_concat

__all__ = ["resolve_checkpoint", "load_model", "load_ensemble", "evaluate_checkpoint", "sample_checkpoint"]

PathLike = Union[str, os.PathLike]


def resolve_checkpoint(path: PathLike) -> Path:
    """``path`` itself if it is a file, else ``path/checkpoint.pt``; ``FileNotFoundError`` if absent."""
    path = Path(path)
    candidate = path / CHECKPOINT_NAME if path.is_dir() else path
    if not candidate.is_file():
        raise FileNotFoundError(f"no checkpoint at {candidate} (give a run folder or a checkpoint.pt file)")
    return candidate


def _read(path: PathLike) -> Tuple[Dict[str, Any], Any]:
    """The checkpoint at ``path`` and its configuration."""
    checkpoint = load_checkpoint(resolve_checkpoint(path), required=("config", "model", "state"))
    return checkpoint, config_from_dict(checkpoint["config"])


def load_model(
    path: PathLike, device: Union[str, torch.device] = "cpu"
) -> Tuple[nn.Module, Union[ToyConfig, RegressionConfig]]:
    """The trained model (in eval mode) and its configuration from a run folder or checkpoint."""
    return _single_model(path, *_read(path), device)


def _single_model(path: PathLike, checkpoint: Dict[str, Any], config: Any,
                  device: Union[str, torch.device]) -> Tuple[nn.Module, Union[ToyConfig, RegressionConfig]]:
    if isinstance(config, ToyEnsembleConfig):
        raise ValueError(
            f"{path} holds {len(config.members)} runs trained together "
            f"({', '.join(f'{m.dataset} seed {m.seed}' for m in config.members)}); "
            "load a member's own run folder, or use load_ensemble"
        )
    if isinstance(config, ToyConfig):
        from monoflow.experiments.toy2d import build_toy_model as build
    else:
        from monoflow.experiments.regression1d import build_regression_model as build
    model = build(config)
    _restore(model, checkpoint, config)
    return model.to(device).eval(), config


def _restore(model: nn.Module, checkpoint: Dict[str, Any], config: Any) -> None:
    """Load the weights, and switch learnable concatenation on as training had it at the saved
    step (the flag is not part of the state dict; without it the learned scales are ignored)."""
    model.load_state_dict(checkpoint["model"])
    set_learnable_concat(model, checkpoint["state"]["step"] >= config.learnable_concat_from)


def load_ensemble(path: PathLike, device: Union[str, torch.device] = "cpu") -> Tuple[List[nn.Module], ToyEnsembleConfig]:
    """The member flows (in eval mode) and configuration of an ensemble's checkpoint."""
    return _ensemble_flows(path, *_read(path), device)


def _ensemble_flows(path: PathLike, checkpoint: Dict[str, Any], config: Any,
                    device: Union[str, torch.device]) -> Tuple[List[nn.Module], ToyEnsembleConfig]:
    from monoflow.experiments.toy2d_ensemble import ToyEnsembleExperiment

    if not isinstance(config, ToyEnsembleConfig):
        raise ValueError(f"{path} is a single {config.experiment} run, not an ensemble; use load_model")
    experiment = ToyEnsembleExperiment(config)
    _restore(experiment.build_model(), checkpoint, config)
    return [flow.to(device).eval() for flow in experiment.flows], config


def evaluate_checkpoint(
    path: PathLike,
    samples: Optional[int] = None,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
) -> Dict[str, Any]:
    """Recompute the test metric of a checkpoint on fresh data drawn with ``seed``.

    ``samples`` defaults to the run's ``test_samples``. Returns the experiment, the metric name and
    value, the inverse round-trip error, the solver statistics and the iteration of the checkpoint;
    for an ensemble's checkpoint, ``members`` holds each member's own results instead.
    """
    from dataclasses import replace

    if samples is not None and samples < 1:
        raise ValueError(f"samples must be positive, got {samples}")
    checkpoint, config = _read(path)
    if isinstance(config, ToyEnsembleConfig):
        return _evaluate_ensemble(path, checkpoint, config, samples, seed, device)
    model, config = _single_model(path, checkpoint, config, device)
    if samples is not None:
        config = replace(config, test_samples=int(samples))
    generator = torch.Generator().manual_seed(int(seed))
    if isinstance(config, ToyConfig):
        from monoflow.experiments.toy2d import toy_test as test

        metric_name = "nll_nats"
    else:
        from monoflow.experiments.regression1d import regression_test as test

        metric_name = "mse"
    result = test(model, config, generator, device)
    return {
        "experiment": config.experiment,
        "checkpoint": str(resolve_checkpoint(path)),
        "iteration": checkpoint["state"]["step"],
        "metric_name": metric_name,
        "samples": config.test_samples,
        "seed": seed,
        **result,
    }


def _evaluate_ensemble(path: PathLike, checkpoint: Dict[str, Any], config: ToyEnsembleConfig,
                       samples: Optional[int], seed: int, device: Union[str, torch.device]) -> Dict[str, Any]:
    """Every member's test NLL, each on its own fresh data drawn with ``seed`` (as its run alone)."""
    from dataclasses import replace

    from monoflow.experiments.toy2d import toy_test

    flows, config = _ensemble_flows(path, checkpoint, config, device)
    members = []
    for flow, member in zip(flows, config.members):
        if samples is not None:
            member = replace(member, test_samples=int(samples))
        result = toy_test(flow, member, torch.Generator().manual_seed(int(seed)), device)
        members.append({"dataset": member.dataset, "seed": member.seed, **result})
    return {
        "experiment": config.experiment,
        "checkpoint": str(resolve_checkpoint(path)),
        "iteration": checkpoint["state"]["step"],
        "metric_name": "nll_nats",
        "samples": config.members[0].test_samples if samples is None else int(samples),
        "seed": seed,
        "members": members,
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

r"""The 1-D staircase regression (the paper's Figure 4): how expressive is each kind of block?

A flow :math:`F: \mathbb{R} \to \mathbb{R}` of two blocks is fitted to the staircase
:math:`y(x)` of :func:`monoflow.data.toy.staircase` (slopes 0.05 and 20 on :math:`[-2, 2]`) by
minimising :math:`\frac1B \sum_i (F(x_i) - y(x_i))^2`. A residual block has slope in
:math:`[1-L, 1+L]`, so two of them cannot reach slope 20 or 0.05; ActNorm adds a learnable scale;
monotone blocks reach slopes in :math:`[(1-L)/(1+L), (1+L)/(1-L)]`. The test metric is the MSE on
``test_samples`` fresh points; the reported number is the mean of the last ``report_last`` tests
(the last one in both presets).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from monoflow.blocks import solver_stats
from monoflow.data.toy import sample_staircase, staircase
from monoflow.experiments.config import RegressionConfig, regression_config
from monoflow.experiments.results import run_directory, summarize_solver
from monoflow.experiments.train import train
from monoflow.lipschitz import update_lipschitz
from monoflow.models import regression_flow
from monoflow.models.toy import REGRESSION_SOLVER

__all__ = ["RegressionExperiment", "run_regression", "build_regression_model", "regression_test"]


def build_regression_model(config: RegressionConfig) -> nn.Module:
    """The 1-D flow of ``config`` (``monoflow.models.regression_flow``)."""
    return regression_flow(
        config.model, depth=config.depth, growth=config.growth, coeff=config.coeff, lip_coeff=config.lip_coeff
    )


def regression_test(
    model: nn.Module,
    config: RegressionConfig,
    generator: torch.Generator,
    device: Union[str, torch.device] = "cpu",
) -> Dict[str, Any]:
    """Test MSE on ``config.test_samples`` fresh points, inverse round-trip error, solver statistics."""
    power = update_lipschitz(model, tol=config.eval_power_tol, max_iterations=config.eval_power_max_iterations)
    x, y = sample_staircase(config.test_samples, generator, config.staircase_slope)
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        prediction, _ = model(x, with_logdet=False)
        mse = torch.mean((prediction - y) ** 2)
        points = x[: config.roundtrip_points]
        back, _ = model.inverse(prediction[: config.roundtrip_points], with_logdet=False)
        roundtrip = (back - points).abs().max() if len(points) else torch.tensor(0.0)
    return {
        "metric": float(mse),
        "roundtrip_max_abs_error": float(roundtrip),
        "power_iterations": int(power),
        "solver": summarize_solver(solver_stats(model), kinds=("forward", "inverse")),
    }


class RegressionExperiment:
    """The 1-D regression for :func:`monoflow.experiments.train.train`."""

    metric_name = "mse"

    def __init__(self, config: RegressionConfig) -> None:
        if not isinstance(config, RegressionConfig):
            raise ValueError(f"RegressionExperiment needs a RegressionConfig, got {type(config).__name__}")
        self.config = config

    def build_model(self) -> nn.Module:
        return build_regression_model(self.config)

    def sample_batch(self, generator: torch.Generator, device: torch.device) -> Tuple[Tensor, Tensor]:
        x, y = sample_staircase(self.config.batch_size, generator, self.config.staircase_slope)
        return x.to(device), y.to(device)

    def loss(self, model: nn.Module, batch: Tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        prediction, _ = model(x, with_logdet=False)
        return torch.mean((prediction - y) ** 2)

    def session_notes(self) -> Dict[str, Any]:
        """How this session's flows solve (recorded with the session in run.json)."""
        return {"solves": f"{REGRESSION_SOLVER.method} ({REGRESSION_SOLVER.table_points}-point table, then bracketing)"}

    def evaluate(self, model: nn.Module, generator: torch.Generator, device: torch.device) -> Dict[str, Any]:
        return regression_test(model, self.config, generator, device)

    def finalize(self, model: nn.Module, run_dir: Path, generator: torch.Generator, device: torch.device) -> Dict[str, Any]:
        """The fitted function on a grid of [-2, 2] against the target; saved as fit.npz / fit.png."""
        from monoflow.experiments.figures import save_regression_figure

        x = torch.linspace(-2.0, 2.0, self.config.figure_points)[:, None]
        with torch.no_grad():
            prediction, _ = model(x.to(device), with_logdet=False)
        arrays = {
            "x": x[:, 0].numpy(),
            "target": staircase(x, self.config.staircase_slope)[:, 0].numpy(),
            "prediction": prediction[:, 0].cpu().numpy(),
        }
        np.savez_compressed(run_dir / "fit.npz", **arrays)
        save_regression_figure(arrays, run_dir / "fit.png", title=self.config.model)
        return {"figure": {"png": "fit.png", "arrays": "fit.npz"}}


def run_regression(
    config: Optional[RegressionConfig] = None,
    output_dir: Union[str, Path] = "results",
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    stop_after: Optional[int] = None,
) -> Dict[str, Any]:
    """Train, test and record one 1-D run in ``output_dir/regression1d/<preset>/<model>/seed<k>``.

    Resumes from the run's checkpoint if there is one; returns the finished record without
    training if the run is already finished.
    """
    config = config if config is not None else regression_config()
    return train(RegressionExperiment(config), run_directory(config, output_dir), device, progress, stop_after)

r"""The 2-D toy density experiment (the paper's Table 1 and Figure 5).

Training minimises the negative log-likelihood in nats,

.. math:: \mathcal{L} = -\frac{1}{B}\sum_{i} \log p(x_i), \qquad
          \log p(x) = \log \mathcal{N}(F(x); 0, I) + \log|\det \partial F / \partial x|,

with the exact 2x2 log-determinant of every block. The test metric is the same quantity on
``test_samples`` fresh samples every ``test_every`` iterations; the reported number is the mean of
the last ``report_last`` tests. The exact log-det of the core propagates the Jacobian forwards
through g (``DenseNet.jacobian``), so tests run under ``torch.no_grad``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from monoflow.blocks import solver_stats
from monoflow.compiled import DEFAULT_NEWTON_STEPS, CompiledFlowLoss, CompiledUpdate
from monoflow.data.toy import sample_toy
from monoflow.experiments.config import TOY_MODELS, ToyConfig, toy_config
from monoflow.experiments.results import run_directory, summarize_solver
from monoflow.experiments.train import train
from monoflow.lipschitz import update_lipschitz
from monoflow.models import toy_flow

__all__ = ["ToyExperiment", "run_toy", "build_toy_model", "toy_test", "DENSITY_EXTENT", "COMPILABLE_MODELS"]

#: Models whose training loss compiles (:class:`monoflow.compiled.CompiledFlowLoss`): all three.
COMPILABLE_MODELS = TOY_MODELS
#: The figure's density grid covers [-4, 4]^2, as the paper's.
DENSITY_EXTENT = 4.0


def build_toy_model(config: ToyConfig) -> nn.Module:
    """The flow of ``config`` (``monoflow.models.toy_flow``)."""
    return toy_flow(
        config.model,
        dim=2,
        nblocks=config.nblocks,
        depth=config.depth,
        growth=config.growth,
        coeff=config.coeff,
        lip_coeff=config.lip_coeff,
        logdet=config.logdet,
    )


def _forward_chunked(model: nn.Module, x: Tensor, chunk: int = 10000) -> Tuple[Tensor, Tensor]:
    """``(z, log|det dz/dx|)`` of ``model`` on ``x``, ``chunk`` points at a time."""
    parts = [model(part) for part in x.split(chunk)]
    return torch.cat([z for z, _ in parts]), torch.cat([logdet for _, logdet in parts])


def _log_prob_chunked(model: nn.Module, x: Tensor, chunk: int = 10000) -> Tensor:
    z, logdet = _forward_chunked(model, x, chunk)
    return model.base.log_prob(z) + logdet


def toy_test(
    model: nn.Module, config: ToyConfig, generator: torch.Generator, device: Union[str, torch.device] = "cpu"
) -> Dict[str, Any]:
    """Test ``model`` on ``config.test_samples`` fresh samples drawn from ``generator``.

    Returns ``metric`` (NLL in nats), ``roundtrip_max_abs_error`` (max |F^-1(F(x)) - x| on the first
    ``roundtrip_points`` test points, inverting the z of the NLL's forward pass),
    ``power_iterations`` run before the test and ``solver`` (statistics of the test's solves:
    forward, of the NLL's last chunk of up to 10,000 points; inverse, of the round trip).
    """
    power = update_lipschitz(model, tol=config.eval_power_tol, max_iterations=config.eval_power_max_iterations)
    x = sample_toy(config.dataset, config.test_samples, generator).to(device)
    with torch.no_grad():
        z, logdet = _forward_chunked(model, x)
        nll = -(model.base.log_prob(z) + logdet).mean()
        points = x[: config.roundtrip_points]
        roundtrip = torch.tensor(0.0)
        if len(points):
            back, _ = model.inverse(z[: len(points)], with_logdet=False)
            roundtrip = (back - points).abs().max()
    return {
        "metric": float(nll),
        "roundtrip_max_abs_error": float(roundtrip),
        "power_iterations": int(power),
        "solver": summarize_solver(solver_stats(model), kinds=("forward", "inverse")),
    }


class ToyExperiment:
    """The 2-D density experiment for :func:`monoflow.experiments.train.train`."""

    metric_name = "nll_nats"

    def __init__(self, config: ToyConfig, compile: bool = False) -> None:
        """``compile=True``: train with :class:`monoflow.compiled.CompiledFlowLoss` and
        :class:`~monoflow.compiled.CompiledUpdate`; tests, figures and the recorded metric use the
        eager flow as always."""
        if not isinstance(config, ToyConfig):
            raise ValueError(f"ToyExperiment needs a ToyConfig, got {type(config).__name__}")
        self.config = config
        self.compile = bool(compile)
        self._compiled_loss: Optional[CompiledFlowLoss] = None
        self._compiled_update: Optional[CompiledUpdate] = None

    def build_model(self) -> nn.Module:
        return build_toy_model(self.config)

    def sample_batch(self, generator: torch.Generator, device: torch.device) -> Tensor:
        return sample_toy(self.config.dataset, self.config.batch_size, generator).to(device)

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        if not self.compile:
            return -model.log_prob(batch).mean()
        if self._compiled_loss is None or self._compiled_loss.flow is not model:
            self._compiled_loss = CompiledFlowLoss(model)
        return self._compiled_loss(batch)

    def compiled_update(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Optional[CompiledUpdate]:
        """With ``compile=True``: Adam's step and the power iterations as one compiled function."""
        if not self.compile:
            return None
        update = self._compiled_update
        if update is None or update.model is not model or update.optimizer is not optimizer:
            update = self._compiled_update = CompiledUpdate(model, optimizer, self.config.power_iterations)
        return update

    def session_notes(self) -> Dict[str, Any]:
        """How this session computes the training loss (recorded with the session in run.json)."""
        if not self.compile:
            return {"training_loss": "eager"}
        solves = f" ({DEFAULT_NEWTON_STEPS} Newton steps per solve)" if self.config.model == "monotone" else ""
        return {"training_loss": "compiled" + solves}

    def evaluate(self, model: nn.Module, generator: torch.Generator, device: torch.device) -> Dict[str, Any]:
        return toy_test(model, self.config, generator, device)

    def finalize(self, model: nn.Module, run_dir: Path, generator: torch.Generator, device: torch.device) -> Dict[str, Any]:
        """Density on a grid over [-4, 4]^2, model samples and data; saved as figure.npz / figure.png
        (and, for a compiled loss, how many of this session's batches fell back to the eager one
        and how long this session spent compiling)."""
        from monoflow.experiments.figures import save_toy_figure

        config = self.config
        axis = np.linspace(-DENSITY_EXTENT, DENSITY_EXTENT, config.figure_grid)
        xx, yy = np.meshgrid(axis, axis)
        grid = torch.tensor(np.stack([xx.ravel(), yy.ravel()], axis=1), dtype=torch.float32, device=device)
        with torch.no_grad():
            density = _log_prob_chunked(model, grid).exp().reshape(xx.shape).cpu().numpy()
            samples = model.sample(config.figure_samples, generator=generator).cpu().numpy()
        data = sample_toy(config.dataset, config.figure_samples, generator).numpy()
        # float32 keeps figure.npz small enough to commit beside run.json
        arrays = {"data": data.astype(np.float32), "axis": axis, "density": density.astype(np.float32),
                  "samples": samples.astype(np.float32)}
        np.savez_compressed(run_dir / "figure.npz", **arrays)
        save_toy_figure(arrays, run_dir / "figure.png", title=f"{config.model} on {config.dataset}")
        finite = bool(np.isfinite(samples).all())
        extra: Dict[str, Any] = {}
        if self._compiled_loss is not None:
            update = self._compiled_update.compile_s if self._compiled_update is not None else 0.0
            solves = self.config.model == "monotone"  # the other models' blocks have no solves in training
            extra["compiled_loss"] = {"newton_steps": self._compiled_loss.newton_steps if solves else None,
                                      "batches_last_session": self._compiled_loss.batches,
                                      "eager_fallbacks_last_session": self._compiled_loss.fallbacks,
                                      "compiles_last_session": self._compiled_loss.compiles,
                                      # part of the forward, backward and optimizer timers
                                      "compile_s_last_session": self._compiled_loss.compile_s + update}
        return {**extra, "figure": {"png": "figure.png", "arrays": "figure.npz", "samples_finite": finite,
                           "density_mass_on_grid": float(density.sum() * (axis[1] - axis[0]) ** 2)}}


def run_toy(
    config: ToyConfig | None = None,
    output_dir: Union[str, Path] = "results",
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
    compile: bool = False,
) -> Dict[str, Any]:
    """Train, test and record one 2-D run in ``output_dir/toy2d/<preset>/<model>/<dataset>/seed<k>``.

    Resumes from the run's checkpoint if there is one; returns the finished record without
    training if the run is already finished (see :func:`monoflow.experiments.train.train`).
    ``compile=True`` trains with the compiled loss (:class:`ToyExperiment`).
    """
    config = config if config is not None else toy_config()
    return train(ToyExperiment(config, compile), run_directory(config, output_dir), device, progress, stop_after)

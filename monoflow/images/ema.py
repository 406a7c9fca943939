r"""Exponential moving average of the weights, used for evaluation (decay 0.999 in the paper's runs).

:math:`\bar\theta \leftarrow d\,\bar\theta + (1-d)\,\theta` after every optimiser step. Buffers
(spectral-norm vectors, ActNorm flags) are not averaged: :meth:`copy_to` takes them from the live
model, and evaluation re-converges the power iterations for the averaged weights.

Why not ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``: that average
starts from the weights after the first step (it copies them when nothing is averaged yet) and
updates by ``lerp``, while the paper's release, and every image run committed here, averages from
the initial weights with ``d * shadow + (1 - d) * p``. Switching would change the EMA weights
that every test bpd is computed from, and runs resumed across the switch would mix the two; it
also keeps a deep copy of the whole module (solver records and buffers included) where only the
parameters are needed.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

__all__ = ["ExponentialMovingAverage"]


class ExponentialMovingAverage:
    """Shadow copy of a model's parameters, updated with :meth:`update`."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: Dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in model.named_parameters()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            self.shadow[name].mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged parameters into ``model`` (same architecture)."""
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:3]} ...")
        self.decay = state["decay"]
        for k in self.shadow:
            self.shadow[k].copy_(state["shadow"][k])

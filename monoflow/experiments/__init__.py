"""Experiments: configurations, the training loop, results on disk, tables and figures.

Modules: ``config`` (dataclasses and presets), ``train`` (the shared loop), ``checkpoint``
(atomic, exactly resumable checkpoints), ``toy2d`` and ``regression1d`` (the two experiments), ``toy2d_ensemble`` (several 2-D runs
trained as one batched model),
``results`` (run records, layout, tables next to the paper's numbers), ``figures``, ``evaluate``
(models back from checkpoints).

>>> from monoflow.experiments import toy_config
>>> toy_config("quick", dataset="moons").dataset
'moons'
"""
from monoflow.experiments.config import (
    PRESETS,
    REGRESSION_MODELS,
    TOY_MODELS,
    RegressionConfig,
    ToyConfig,
    ToyEnsembleConfig,
    regression_config,
    toy_config,
)
from monoflow.experiments.evaluate import evaluate_checkpoint, load_model, sample_checkpoint
from monoflow.experiments.regression1d import run_regression
from monoflow.experiments.results import find_runs, load_run, regression_table, toy_seed_spread, toy_table, write_tables
from monoflow.experiments.toy2d import run_toy
from monoflow.experiments.toy2d_ensemble import run_toy_ensemble

__all__ = [
    "PRESETS",
    "TOY_MODELS",
    "REGRESSION_MODELS",
    "ToyConfig",
    "RegressionConfig",
    "toy_config",
    "regression_config",
    "run_toy",
    "ToyEnsembleConfig",
    "run_toy_ensemble",
    "run_regression",
    "load_run",
    "find_runs",
    "toy_table",
    "toy_seed_spread",
    "regression_table",
    "write_tables",
    "load_model",
    "evaluate_checkpoint",
    "sample_checkpoint",
]

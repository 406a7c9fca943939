"""Checks of the book notebooks' papermill parameters: moved to :mod:`monoflow.notebooks.parameters`.

This module re-exports its names so that ``from monoflow.notebook_parameters import
check_parameters`` keeps working.
"""
from __future__ import annotations

from monoflow.notebooks.parameters import (
    NOTEBOOK_PARAMETERS,
    Check,
    Choices,
    check_parameters,
    declared_names,
    require_finished_runs,
)

__all__ = ["NOTEBOOK_PARAMETERS", "check_parameters", "declared_names", "require_finished_runs"]

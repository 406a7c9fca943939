"""The book's chapters: one :class:`NotebookSpec` per notebook in ``notebooks/``, with the
parameters of its smallest run (``monoflow book --quick``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Tuple

__all__ = ["NotebookSpec", "NOTEBOOKS"]


@dataclass(frozen=True)
class NotebookSpec:
    """One chapter of the book backed by a notebook in ``notebooks/``.

    ``quick`` holds the parameters of the smallest run that still exercises the real code
    (used by ``monoflow book --quick`` and the tests); the book's default parameters are the
    notebook's own (read the committed results).
    """

    name: str
    title: str
    quick: Mapping[str, Any] = field(default_factory=dict)


# The smallest runs that still train every model for a few steps: each notebook well under a
# minute on two CPU cores (the book test runs them all).
_QUICK_REGRESSION = {"test_every": 2, "test_samples": 200, "batch_size": 64, "growth": 16, "depth": 2,
                     "figure_points": 200}
_QUICK_TOY = {"test_every": 2, "test_samples": 200, "batch_size": 64, "nblocks": 2, "figure_grid": 30,
              "figure_samples": 300, "roundtrip_points": 16}

NOTEBOOKS: Tuple[NotebookSpec, ...] = (
    NotebookSpec(
        "01_theory",
        "Theory: monotone operators as flows",
        quick={"n_pairs": 400, "n_maps": 60, "grid_size": 121},
    ),
    NotebookSpec(
        "02_expressivity_1d",
        "1-D expressivity (Figure 4)",
        quick={"rerun": True, "preset": "quick", "iterations": 4, "overrides": _QUICK_REGRESSION},
    ),
    NotebookSpec(
        "03_toy_densities_2d",
        "2-D toy densities (Table 1)",
        quick={"rerun": True, "preset": "quick", "iterations": 4, "datasets": ["8gaussians"],
               "models": ["idensenet", "monotone"], "overrides": _QUICK_TOY},
    ),
    NotebookSpec(
        "04_images",
        "Image benchmarks (Table 2)",
        quick={},
    ),
    NotebookSpec(
        "05_speed",
        "How long it takes",
        quick={},
    ),
)

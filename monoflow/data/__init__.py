"""Data: the 2-D toy densities and the 1-D staircase target (``monoflow.data.toy``)."""
from monoflow.data.toy import (
    TOY_DATASETS,
    as_torch_generator,
    sample_staircase,
    sample_toy,
    staircase,
)

__all__ = ["TOY_DATASETS", "as_torch_generator", "sample_staircase", "sample_toy", "staircase"]

"""monoflow: Monotone Flows (Ahn et al., NeurIPS 2022) in PyTorch.

The math core: :mod:`monoflow.activations`, :mod:`monoflow.lipschitz`, :mod:`monoflow.solvers`,
:mod:`monoflow.implicit`, :mod:`monoflow.logdet`, :mod:`monoflow.blocks`, :mod:`monoflow.flows`
(and :mod:`monoflow.distributions`, the blocks as ``torch.distributions`` transforms); model
builders in :mod:`monoflow.models`.
"""
__version__ = "0.1.0"  # the only place the version is written; pyproject.toml reads it

from monoflow.blocks import ActNorm, ImplicitBlock, MonotoneBlock, ResidualBlock, solver_stats
from monoflow.distributions import BlockTransform
from monoflow.flows import Flow, StandardNormal
from monoflow.lipschitz import certify_lipschitz, dense_convnet, dense_mlp, set_learnable_concat, update_lipschitz
from monoflow.logdet import ExactLogDet, PowerSeriesLogDet, RussianRouletteLogDet
from monoflow.solvers import SolverError, SolverOptions

__all__ = [
    "__version__",
    "MonotoneBlock",
    "ResidualBlock",
    "ImplicitBlock",
    "ActNorm",
    "Flow",
    "StandardNormal",
    "BlockTransform",
    "dense_mlp",
    "dense_convnet",
    "update_lipschitz",
    "certify_lipschitz",
    "set_learnable_concat",
    "ExactLogDet",
    "PowerSeriesLogDet",
    "RussianRouletteLogDet",
    "SolverOptions",
    "SolverError",
    "solver_stats",
]

r"""Builders of the paper's small models: the 2-D toy density flows and the 1-D regression flows.

``toy_flow`` defaults are the paper's 2-D settings (SPEC.md section 4): 10 blocks, DenseNet g of
depth 3 and growth 16, coeff 0.9, lip_coeff 0.98, exact 2x2 log-det, no ActNorm. They give exactly
5,640 trainable parameters for ``"monotone"`` (CPila) and 5,670 for ``"idensenet"`` (CLipSwish).
``"resflow"`` (Residual Flow: residual blocks with a spectral-normalised LipSwish MLP) uses hidden
width 15 per layer so its 5,600 parameters match the other two.

``regression_flow`` builds the four 1-D models of the paper's Figure 4 (DenseNet g of depth 4,
growth 128, CReLU, coeff and lip_coeff 0.99): 100,372 / 100,378 / 100,376 / 100,378 parameters.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from torch import nn

from monoflow.activations import LipSwish
from monoflow.blocks import ActNorm, ImplicitBlock, MonotoneBlock, ResidualBlock
from monoflow.flows import Flow
from monoflow.lipschitz import LipschitzChain, SpectralNormLinear, dense_mlp
from monoflow.logdet import LogDetEstimator
from monoflow.solvers import SolverOptions

__all__ = ["toy_flow", "regression_flow", "lipswish_mlp", "TOY_KINDS", "REGRESSION_KINDS"]

TOY_KINDS = ("monotone", "idensenet", "resflow")
REGRESSION_KINDS = ("residual", "residual_actnorm", "implicit_actnorm", "monotone_actnorm")


def lipswish_mlp(dim: int, hidden: Sequence[int], coeff: float = 0.9) -> LipschitzChain:
    """Residual Flow's g: spectral-normalised Linear layers with LipSwish between them (an
    ``nn.Sequential`` that also propagates Jacobians)."""
    widths = [dim, *hidden, dim]
    layers: List[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        if i > 0:
            layers.append(LipSwish())
        layers.append(SpectralNormLinear(fan_in, fan_out, coeff=coeff))
    return LipschitzChain(*layers)


#: the forward solves of the 1-D flows: one number per sample (monoflow.scalar_resolvent)
REGRESSION_SOLVER = SolverOptions(method="scalar")
#: the solves of the 2-D flows: Anderson from two Newton steps (g propagates its 2x2 Jacobian)
TOY_SOLVER = SolverOptions(start="newton")


def _small_dim_adjoint(has_jacobian: bool) -> Optional[SolverOptions]:
    """In a few dimensions the adjoint is one dense solve with the Jacobian (DenseNet g has it)."""
    return SolverOptions(method="direct") if has_jacobian else None


def _check_choice(kind: str, valid: Sequence[str], what: str) -> None:
    if kind not in valid:
        raise ValueError(f"unknown {what} {kind!r}; expected one of {', '.join(valid)}")


def toy_flow(
    kind: str,
    dim: int = 2,
    nblocks: int = 10,
    depth: int = 3,
    growth: int = 16,
    coeff: float = 0.9,
    lip_coeff: float = 0.98,
    logdet: "str | LogDetEstimator | None" = "exact",
    actnorm: bool = False,
    resflow_hidden: int = 15,
    solver: Optional[SolverOptions] = None,
    adjoint: Optional[SolverOptions] = None,
) -> Flow:
    """The 2-D toy density flow of Table 1.

    Args:
        kind: ``"monotone"`` (monotone blocks + CPila), ``"idensenet"`` (residual blocks +
            CLipSwish) or ``"resflow"`` (residual blocks + LipSwish MLP with ``depth`` hidden layers
            of width ``resflow_hidden``).
        dim, nblocks, depth, growth, coeff, lip_coeff: architecture (defaults: the paper's).
        logdet: log-det estimator of every block (the paper uses the exact one in 2-D).
        actnorm: add an ActNorm after every block (the paper's toy runs have none).
        solver, adjoint: fixed-point solver settings (default solver for ``dim <= 2``:
            :data:`TOY_SOLVER`, Anderson started after two Newton steps; default adjoint: ``"direct"``, a dense 2x2
            solve per sample, for the DenseNet kinds).

    >>> sum(p.numel() for p in toy_flow("monotone").parameters())
    5640
    """
    _check_choice(kind, TOY_KINDS, "toy flow kind")
    adjoint = adjoint or _small_dim_adjoint(kind != "resflow")
    # Newton steps propagate the d x d Jacobian: worth it in the paper's 2-D, not for wide inputs
    solver = solver or (TOY_SOLVER if dim <= 2 else None)
    blocks: List[nn.Module] = []
    for _ in range(nblocks):
        if kind == "monotone":
            block = MonotoneBlock(dense_mlp(dim, depth, growth, "cpila", coeff, lip_coeff), logdet, solver, adjoint)
        elif kind == "idensenet":
            block = ResidualBlock(dense_mlp(dim, depth, growth, "clipswish", coeff, lip_coeff), logdet, solver, adjoint)
        else:
            block = ResidualBlock(lipswish_mlp(dim, [resflow_hidden] * depth, coeff), logdet, solver, adjoint)
        blocks.append(block)
        if actnorm:
            blocks.append(ActNorm(dim))
    return Flow(blocks, event_shape=(dim,))


def regression_flow(
    kind: str,
    depth: int = 4,
    growth: int = 128,
    coeff: float = 0.99,
    lip_coeff: float = 0.99,
    logdet: "str | LogDetEstimator | None" = None,
    solver: Optional[SolverOptions] = None,
    adjoint: Optional[SolverOptions] = None,
) -> Flow:
    """A 1-D model of Figure 4 (a map R -> R fitted by regression; no log-det by default).

    ``"residual"``: two residual blocks; ``"residual_actnorm"``: the same with ActNorm before,
    between and after them (learnable scaling); ``"implicit_actnorm"``: one implicit block (a
    residual and an inverted residual block) between ActNorms; ``"monotone_actnorm"``: two
    monotone blocks with ActNorms.

    The solves default to :data:`REGRESSION_SOLVER`, ``method="scalar"`` (one number per sample: a table of
    z + s g(z), then bracketing; :mod:`monoflow.scalar_resolvent`).
    """
    _check_choice(kind, REGRESSION_KINDS, "regression flow kind")
    adjoint = adjoint or _small_dim_adjoint(True)
    solver = solver or REGRESSION_SOLVER

    def g() -> nn.Module:
        return dense_mlp(1, depth, growth, "crelu", coeff, lip_coeff)

    if kind == "residual":
        blocks: List[nn.Module] = [ResidualBlock(g(), logdet, solver, adjoint) for _ in range(2)]
    elif kind == "residual_actnorm":
        blocks = [ActNorm(1), ResidualBlock(g(), logdet, solver, adjoint), ActNorm(1),
                  ResidualBlock(g(), logdet, solver, adjoint), ActNorm(1)]
    elif kind == "implicit_actnorm":
        blocks = [ActNorm(1), ImplicitBlock(g(), g(), logdet, solver, adjoint), ActNorm(1)]
    else:
        blocks = [ActNorm(1), MonotoneBlock(g(), logdet, solver, adjoint), ActNorm(1),
                  MonotoneBlock(g(), logdet, solver, adjoint), ActNorm(1)]
    return Flow(blocks, event_shape=(1,))

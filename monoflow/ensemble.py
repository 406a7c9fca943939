r"""Independent flows of one architecture trained together, as one batched model.

An ensemble of :math:`E` flows :math:`f_1, \dots, f_E` (same architecture, own parameters) takes a
batch of :math:`E \cdot B` rows: rows :math:`[eB, (e+1)B)` belong to member :math:`e`. Every g is
replaced by :class:`EnsembleDenseNet` or :class:`EnsembleChain`, which hold the members' own
networks and evaluate them at once: each linear map is one batched product (``torch.bmm``) of the
members' stacked normalised weights, each activation one call on all rows. Solvers, log-det
estimators and blocks are the ordinary ones, working row by row.

Members share no parameter, so the gradient of :math:`\sum_e \mathcal{L}_e(\theta_e)` with
respect to :math:`\theta_e` is that of :math:`\mathcal{L}_e` alone, and Adam and the power
iterations act elementwise / per layer: training the ensemble on the sum of the members' losses
trains every member as it would be trained alone, up to floating-point rounding (the shared
fixed-point solves hold each converged row at its converged iterate, so every row stops where it
would alone).

Why: the paper's 2-D models are small (500 x <= 50 tensors), so a good part of an iteration is
per-operation overhead, which :math:`E` runs in one process share (1.3 to 1.7 times the
throughput on one CPU thread, ``benchmarks/ensemble_speed.py``).

>>> from monoflow.models import toy_flow
>>> flows = [toy_flow("monotone", nblocks=2, depth=1, growth=4) for _ in range(3)]
>>> ensemble = stack_flows(flows)
>>> ensemble.log_prob(torch.randn(3 * 5, 2)).shape
torch.Size([15])
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from monoflow.blocks import MonotoneBlock, ResidualBlock
from monoflow.flows import Flow
from monoflow.lipschitz import (
    DenseNet,
    LipschitzDenseLayer,
    SpectralNormLinear,
    chain_lipschitz_bounds,
    dense_layer_output,
    reused_transform,
)
from monoflow.solvers import SolverOptions

__all__ = ["EnsembleDenseNet", "EnsembleChain", "stack_flows", "split_members"]


def split_members(t: Tensor, members: int) -> Tensor:
    """View ``t`` of shape (E*B, ...) as (E, B, ...)."""
    if t.shape[0] % members:
        raise ValueError(f"{t.shape[0]} rows cannot be split among {members} ensemble members")
    return t.reshape((members, t.shape[0] // members) + tuple(t.shape[1:]))


def _architecture(module: nn.Module) -> List[Tuple[str, Tuple[int, ...]]]:
    """Types and parameter shapes of a network, in order: equal for stackable members."""
    return [(type(m).__name__, tuple(tuple(p.shape) for p in m.parameters(recurse=False)))
            for m in module.modules()]


class _StackedNetwork(nn.Module):
    """Shared machinery: the members, their stacked weights and per-row parameters."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        reference = _architecture(members[0])
        for index, member in enumerate(members[1:], start=1):
            if _architecture(member) != reference:
                raise ValueError(f"ensemble member {index} has another architecture than member 0")
        self.members = nn.ModuleList(members)

    @property
    def size(self) -> int:
        return len(self.members)

    def _rows_per_member(self, x: Tensor) -> int:
        if x.shape[0] % self.size:
            raise ValueError(
                f"an ensemble of {self.size} networks needs a multiple of {self.size} rows, got "
                f"{x.shape[0]}; fixed-point solves must not drop converged rows "
                "(SolverOptions(freeze_converged=False), as stack_flows sets)"
            )
        return x.shape[0] // self.size

    def _linear(self, position: int, layers: Sequence[SpectralNormLinear], t: Tensor) -> Tensor:
        r"""Member e's :math:`\bar W_e t + b_e` on its rows of ``t`` (rows, ..., in): one ``bmm``."""
        def stack() -> Tuple[Tensor, Optional[Tensor]]:
            weights = torch.stack([layer.normalized_weight() for layer in layers]).transpose(1, 2)
            if layers[0].bias is None:
                return weights, None
            return weights, torch.stack([layer.bias for layer in layers]).unsqueeze(1)

        weights, bias = reused_transform(self, ("linear", position, torch.is_grad_enabled()), stack)
        grouped = t.reshape(self.size, -1, t.shape[-1])
        if bias is None or t.dim() > 2:  # Jacobians get no bias
            out = torch.bmm(grouped, weights)
        else:
            out = torch.baddbmm(bias, grouped, weights)
        return out.reshape(tuple(t.shape[:-1]) + (weights.shape[-1],))

    def _per_row(self, name: Tuple, values: Sequence[Tensor], rows: int) -> Tensor:
        """One value per member, repeated for each of its ``rows`` rows: shape (E*rows, 1)."""
        def expand() -> Tensor:
            return torch.stack(list(values)).reshape(self.size, 1).expand(self.size, rows).reshape(-1, 1)

        return reused_transform(self, (name, rows, torch.is_grad_enabled()), expand)

    def _beta(self, position: int, activations: Sequence[nn.Module], rows: int) -> Optional[Tensor]:
        """Per-row activation parameter (LipSwish's beta) or ``None`` for parameter-free ones."""
        if not hasattr(activations[0], "forward_with_beta"):
            return None
        return self._per_row(("beta", position), [a.beta for a in activations], rows)

    def lipschitz_bound(self) -> float:
        """The largest member bound (every member's g must be a contraction)."""
        return max(float(member.lipschitz_bound()) for member in self.members)  # type: ignore[operator]


def _check_activations(modules: Sequence[nn.Module]) -> None:
    for module in modules:
        if any(True for _ in module.parameters(recurse=False)) and not hasattr(module, "forward_with_beta"):
            raise ValueError(
                f"activation {type(module).__name__} has parameters but no forward_with_beta: it "
                "cannot be evaluated for several ensemble members at once"
            )


class EnsembleDenseNet(_StackedNetwork):
    r"""E Lipschitz DenseNets (:func:`monoflow.lipschitz.dense_mlp`, flat inputs) evaluated as one
    on (E*B, d) rows; :meth:`jacobian` propagates the Jacobian as :class:`DenseNet` does."""

    def __init__(self, members: Sequence[DenseNet]) -> None:
        super().__init__(members)
        for member in members:
            if not isinstance(member, DenseNet):
                raise ValueError(f"EnsembleDenseNet stacks DenseNets, got {type(member).__name__}")
            for layer in member.layers[:-1]:
                if not (isinstance(layer, LipschitzDenseLayer) and type(layer.linear) is SpectralNormLinear):
                    raise ValueError("EnsembleDenseNet needs flat dense layers (dense_mlp)")
            if type(member.layers[-1]) is not SpectralNormLinear:
                raise ValueError("EnsembleDenseNet needs a SpectralNormLinear last layer (dense_mlp)")
            _check_activations([layer.activation for layer in member.layers[:-1]])

    def _run(self, x: Tensor, with_jacobian: bool) -> Tuple[Tensor, Optional[Tensor]]:
        rows = self._rows_per_member(x)
        jac = None
        if with_jacobian:
            batch, dim = x.shape
            jac = torch.eye(dim, dtype=x.dtype, device=x.device).expand(batch, dim, dim)
        depth = len(self.members[0].layers)
        for position in range(depth - 1):
            layers = [member.layers[position] for member in self.members]
            linears = [layer.linear for layer in layers]
            pre = self._linear(position, linears, x)
            pre_jac = None if jac is None else self._linear(position, linears, jac)
            eta1, eta2 = self._etas(position, layers, rows)
            beta = self._beta(position, [layer.activation for layer in layers], rows)
            x, jac = dense_layer_output(layers[0].activation, x, pre, eta1, eta2, jac, pre_jac, beta)
        last = [member.layers[-1] for member in self.members]
        out = self._linear(depth - 1, last, x)
        if jac is None:
            return out, None
        return out, self._linear(depth - 1, last, jac).transpose(1, 2)

    def _etas(self, position: int, layers: Sequence[LipschitzDenseLayer], rows: int):
        """Member scales: the common constant while frozen, else per-row tensors (E*rows, 1)."""
        if not any(layer.learnable_concat for layer in layers):
            return layers[0].etas()
        eta1, eta2 = zip(*(layer.etas() for layer in layers))
        return (self._per_row(("eta1", position), [torch.as_tensor(eta) for eta in eta1], rows),
                self._per_row(("eta2", position), [torch.as_tensor(eta) for eta in eta2], rows))

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, with_jacobian=False)[0]

    def jacobian(self, w: Tensor) -> Tuple[Tensor, Tensor]:
        """``(g(w), J)`` with ``J[i] = dg_e/dw`` at row i (e its member), shape (E*B, d, d)."""
        if w.dim() != 2:
            raise ValueError(f"EnsembleDenseNet.jacobian expects flat inputs (rows, d), got {tuple(w.shape)}")
        return self._run(w, with_jacobian=True)  # type: ignore[return-value]


class EnsembleChain(_StackedNetwork):
    """E chains (``nn.Sequential``) of :class:`SpectralNormLinear` layers and activations (Residual
    Flow's g, :func:`monoflow.models.toy.lipswish_mlp`) evaluated as one on (E*B, d) rows."""

    def __init__(self, members: Sequence[nn.Sequential]) -> None:
        super().__init__(members)
        for member in members:
            if not isinstance(member, nn.Sequential):
                raise ValueError(f"EnsembleChain stacks nn.Sequential chains, got {type(member).__name__}")
            for layer in member:
                if not (type(layer) is SpectralNormLinear or hasattr(layer, "lipschitz_constant")):
                    raise ValueError(f"EnsembleChain cannot stack a {type(layer).__name__} layer")
            _check_activations([layer for layer in member if type(layer) is not SpectralNormLinear])

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, with_jacobian=False)[0]

    def jacobian(self, w: Tensor) -> Tuple[Tensor, Tensor]:
        """``(g(w), J)`` with ``J[i] = dg_e/dw`` at row i (e its member), shape (E*B, d, d),
        propagated forwards as :class:`~monoflow.lipschitz.LipschitzChain` does."""
        if w.dim() != 2:
            raise ValueError(f"EnsembleChain.jacobian expects flat inputs (rows, d), got {tuple(w.shape)}")
        return self._run(w, with_jacobian=True)  # type: ignore[return-value]

    def _run(self, x: Tensor, with_jacobian: bool) -> Tuple[Tensor, Optional[Tensor]]:
        rows = self._rows_per_member(x)
        jac = None
        if with_jacobian:  # transposed, (rows, d, channels): each linear map is one bmm
            jac = torch.eye(x.shape[1], dtype=x.dtype, device=x.device).expand(x.shape[0], x.shape[1], x.shape[1])
        for position, first in enumerate(self.members[0]):
            layers = [member[position] for member in self.members]
            if type(first) is SpectralNormLinear:
                x = self._linear(position, layers, x)
                jac = None if jac is None else self._linear(position, layers, jac)
                continue
            beta = self._beta(position, layers, rows)
            if jac is not None:
                slope = first.derivative(x) if beta is None else first.derivative_with_beta(x, beta)
                jac = slope.unsqueeze(1) * jac
            x = first(x) if beta is None else first.forward_with_beta(x, beta)
        return x, None if jac is None else jac.transpose(1, 2)

    def lipschitz_bound(self) -> float:
        """The largest member bound (product of each chain's layer bounds)."""
        return max(chain_lipschitz_bounds(member)[0] for member in self.members)  # type: ignore[index]


def _stack_networks(networks: Sequence[nn.Module]) -> nn.Module:
    if all(isinstance(g, DenseNet) for g in networks):
        return EnsembleDenseNet(networks)  # type: ignore[arg-type]
    if all(isinstance(g, nn.Sequential) for g in networks):
        return EnsembleChain(networks)  # type: ignore[arg-type]
    raise ValueError(f"cannot stack networks of types {sorted({type(g).__name__ for g in networks})}")


def _whole_batch(options: Optional[SolverOptions]) -> SolverOptions:
    return (options or SolverOptions()).with_(freeze_converged=False)


def stack_flows(flows: Sequence[Flow]) -> Flow:
    """One :class:`Flow` on (E*B, d) rows that evaluates the E given flows together.

    The flows must have the same architecture, made of :class:`MonotoneBlock` and
    :class:`ResidualBlock` with flat g (``toy_flow``'s kinds). The ensemble *shares* the members'
    modules: training it trains them, and each flow stays usable on its own (evaluation,
    sampling, ``state_dict``)."""
    flows = list(flows)
    if not flows:
        raise ValueError("stack_flows needs at least one flow")
    if len({len(flow.blocks) for flow in flows}) != 1:
        raise ValueError("the flows to stack have different numbers of blocks")
    blocks: List[nn.Module] = []
    for position, group in enumerate(zip(*(flow.blocks for flow in flows))):
        kind = type(group[0])
        if kind not in (MonotoneBlock, ResidualBlock) or any(type(block) is not kind for block in group):
            raise ValueError(
                f"block {position}: stack_flows supports MonotoneBlock and ResidualBlock in the same "
                f"places, got {sorted({type(block).__name__ for block in group})}"
            )
        first = group[0]
        # only the forward / inverse solves evaluate g on subsets of rows; adjoint solves take
        # vector-Jacobian products of the whole batch's graph and keep their options
        blocks.append(kind(_stack_networks([block.g for block in group]), first.logdet_estimator,
                           _whole_batch(first.solver), first.adjoint))
    return Flow(blocks, event_shape=flows[0].event_shape)

"""Lipschitz certificates: rigorous upper bounds of Lip(g) for every network g of a model, from
exact singular values, convolution norms and known activation constants, independent of the
power iteration; and their record for a run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch.nn as nn

from monoflow.lipschitz.dense import DenseNet
from monoflow.lipschitz.spectral_norm import SpectralNormLayer

__all__ = ["LipschitzCertificate", "chain_lipschitz_bounds", "certify_lipschitz", "lipschitz_upper_bound", "certificates_record"]



@dataclass(frozen=True)
class LipschitzCertificate:
    """Certified Lipschitz bound of one network ``g`` (``name`` as in ``model.named_modules``).

    ``bound`` is rigorous (exact / FFT norms), ``estimate_from_power_iteration`` what the
    power-iteration vectors say, ``holds`` whether ``bound < 1`` (the blocks need Lip(g) < 1).
    """

    name: str
    bound: float
    estimate_from_power_iteration: float
    holds: bool


def chain_lipschitz_bounds(chain: nn.Sequential) -> Optional[Tuple[float, float]]:
    """(rigorous, power-iteration) bounds of a Sequential of spectral-norm layers and activations
    with a known Lipschitz constant; ``None`` if some layer cannot be bounded."""
    bound, estimate = 1.0, 1.0
    for layer in chain:
        if isinstance(layer, SpectralNormLayer):
            bound *= layer.lipschitz_bound()
            estimate *= layer.lipschitz_estimate()
        elif hasattr(layer, "lipschitz_constant"):
            bound *= float(layer.lipschitz_constant)
            estimate *= float(layer.lipschitz_constant)
        else:
            return None
    return bound, estimate


def certify_lipschitz(model: nn.Module) -> List[LipschitzCertificate]:
    """An independent upper bound of Lip(g) for every :class:`DenseNet` in ``model`` and every
    ``nn.Sequential`` chain of spectral-norm layers and activations (Residual Flow's g)."""
    certificates = []
    for name, module in model.named_modules():
        if isinstance(module, DenseNet):
            bound, estimate = module.lipschitz_bound(), module.lipschitz_estimate()
        elif isinstance(module, nn.Sequential) and any(isinstance(m, SpectralNormLayer) for m in module):
            bounds = chain_lipschitz_bounds(module)
            if bounds is None:
                continue
            bound, estimate = bounds
        else:
            continue
        certificates.append(LipschitzCertificate(
            name=name or "g", bound=bound, estimate_from_power_iteration=estimate, holds=bound < 1.0,
        ))
    return certificates


def lipschitz_upper_bound(module: nn.Module) -> Optional[float]:
    r"""A rigorous upper bound of :math:`\mathrm{Lip}(\text{module})` read from its structure, or
    ``None`` where the structure gives none.

    Known: a module's own ``lipschitz_bound()`` (spectral-norm layers, dense layers,
    :class:`DenseNet`, ensembles of them), a ``lipschitz_constant`` attribute (the activations,
    or a parameter-free map that declares its constant), ``nn.Identity`` (1), and an
    ``nn.Sequential`` of known modules (the product of their bounds).

    Raises:
        RuntimeError: the bound exists but cannot be computed yet (a convolution whose input
            size is not known before its first forward pass).

    Example:
        >>> from monoflow.lipschitz import SpectralNormLinear
        >>> lipschitz_upper_bound(nn.Sequential(SpectralNormLinear(2, 2, coeff=0.5), nn.Identity())) < 1
        True
        >>> lipschitz_upper_bound(nn.Tanh()) is None
        True
    """
    bound_fn = getattr(module, "lipschitz_bound", None)
    if callable(bound_fn):
        return float(bound_fn())
    constant = getattr(module, "lipschitz_constant", None)
    if constant is not None:
        return float(constant)
    if isinstance(module, nn.Identity):
        return 1.0
    if isinstance(module, nn.Sequential):
        bound = 1.0
        for layer in module:
            layer_bound = lipschitz_upper_bound(layer)
            if layer_bound is None:
                return None
            bound *= layer_bound
        return bound
    return None


def certificates_record(model: nn.Module) -> dict:
    """The certificates of :func:`certify_lipschitz` as plain data for a run record:
    ``bound_max``, ``all_below_one`` and one entry per network g (``name``, ``bound``,
    ``estimate_from_power_iteration``, ``holds``)."""
    from dataclasses import asdict

    certificates = certify_lipschitz(model)
    return {
        "bound_max": max((c.bound for c in certificates), default=None),
        "all_below_one": all(c.holds for c in certificates),
        "networks": [asdict(c) for c in certificates],
        "definition": "rigorous upper bound of Lip(g) of each block's network g (exact singular values of the "
                      "linear layers, FFT bounds of convolutions, known activation constants), independent of the "
                      "power iteration",
    }

r"""Lipschitz-constrained networks: spectral normalisation and the Lipschitz DenseNet (i-DenseNet).

Spectral normalisation. A layer with weight :math:`W` uses

.. math::  \bar W = W / \max(1, \sigma / c),

where :math:`c` is ``coeff`` and :math:`\sigma = u^\top W v` comes from persistent power-iteration
vectors :math:`u, v` (constants for autograd). The forward pass never runs the power iteration;
:func:`update_lipschitz` does (after each optimiser step and before evaluation). For a
convolution, :math:`\sigma` is the norm of the convolution *operator* at the layer's input size.

Lipschitz dense layer. :math:`x \mapsto [\eta_1 x,\ \eta_2\, a(\bar W x + b)]` (concatenation along
dim 1) with :math:`\eta_i = \mathrm{softplus}(K_i) + 0.1`, rescaled so that
:math:`\|(\eta_1, \eta_2)\|_2 = ` ``lip_coeff``. Its Lipschitz constant is at most
:math:`\sqrt{\eta_1^2 + \eta_2^2 (\mathrm{Lip}(a)\,\|\bar W\|)^2}`, and the network
:math:`g` (``depth`` dense layers, then a normalised layer back to the input width) is bounded
by the product over its layers. :func:`certify_lipschitz` computes that product from the exact
singular values (linear layers) or an FFT bound (convolutions), independently of the power
iteration.

Why not ``torch.nn.utils.parametrizations.spectral_norm``: it always divides by :math:`\sigma`
(no ``max(1, \sigma/c)``, so no coefficient below 1), runs its power iteration inside every
training forward (the fixed-point solves evaluate g many times per step, and the weights must
not change between those evaluations), and normalises a convolution's reshaped kernel matrix,
whose norm is not the convolution operator's and does not bound its Lipschitz constant. Nor does
it give a rigorous bound to certify the result.

The package, bottom-up (each module imports only those above it):

- :mod:`~monoflow.lipschitz.validation`: argument checks shared by the layers;
- :mod:`~monoflow.lipschitz.parameter_reuse`: :func:`reuse_parameter_transforms`, one
  normalised weight and one pair of scales per flow pass;
- :mod:`~monoflow.lipschitz.conv_norm`: operator norms of convolutions (FFT bound, exact norm);
- :mod:`~monoflow.lipschitz.spectral_norm`: :class:`SpectralNormLinear`,
  :class:`SpectralNormConv2d` and their power iteration;
- :mod:`~monoflow.lipschitz.chain`: :class:`LipschitzChain` and forward Jacobian propagation;
- :mod:`~monoflow.lipschitz.dense_fused`: a flat DenseNet's value, Jacobian and gradients by one
  fused kernel call (:mod:`monoflow.kernels`), as an autograd Function and as torch operators;
- :mod:`~monoflow.lipschitz.dense`: :class:`LipschitzDenseLayer`, :class:`DenseNet`,
  :func:`dense_mlp`, :func:`dense_convnet`, :func:`set_learnable_concat`;
- :mod:`~monoflow.lipschitz.power_iteration`: :func:`update_lipschitz`;
- :mod:`~monoflow.lipschitz.certificate`: :func:`certify_lipschitz`,
  :func:`lipschitz_upper_bound`, :func:`certificates_record`.

Every name is importable from ``monoflow.lipschitz`` itself.
"""
from __future__ import annotations

from monoflow.lipschitz.certificate import (
    LipschitzCertificate,
    certificates_record,
    certify_lipschitz,
    chain_lipschitz_bounds,
    lipschitz_upper_bound,
)
from monoflow.lipschitz.chain import LipschitzChain
from monoflow.lipschitz.conv_norm import DENSE_CONV_NORM_LIMIT, conv_operator_norm_bound, conv_operator_norm_exact
from monoflow.lipschitz.dense import (
    ActivationSpec,
    DenseNet,
    LipschitzDenseLayer,
    dense_convnet,
    dense_layer_output,
    dense_mlp,
    set_learnable_concat,
)
from monoflow.lipschitz.parameter_reuse import _PASS, reuse_parameter_transforms, reused_transform
from monoflow.lipschitz.power_iteration import update_lipschitz
from monoflow.lipschitz.spectral_norm import SpectralNormConv2d, SpectralNormLayer, SpectralNormLinear

__all__ = [
    "SpectralNormLayer",
    "SpectralNormLinear",
    "SpectralNormConv2d",
    "conv_operator_norm_bound",
    "conv_operator_norm_exact",
    "LipschitzDenseLayer",
    "DenseNet",
    "LipschitzChain",
    "dense_mlp",
    "dense_convnet",
    "set_learnable_concat",
    "update_lipschitz",
    "LipschitzCertificate",
    "certify_lipschitz",
    "lipschitz_upper_bound",
    "certificates_record",
    "reuse_parameter_transforms",
    "reused_transform",
    "chain_lipschitz_bounds",
    "dense_layer_output",
]

"""Operator norms of 2-D convolutions at a given input size: an FFT upper bound for any size,
and the exact norm from the dense matrix for small layers."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["conv_operator_norm_bound", "conv_operator_norm_exact", "DENSE_CONV_NORM_LIMIT"]



def conv_operator_norm_bound(
    weight: torch.Tensor, input_size: Tuple[int, int], padding: Tuple[int, int]
) -> float:
    r"""Upper bound of the operator norm of ``conv2d(x, weight, padding=padding)`` on inputs of
    spatial size ``input_size`` (any stride: striding only drops outputs).

    The zero-padded convolution is the zero-padding embedding (an isometry) followed by a
    circular convolution on the :math:`(H + 2p_h) \times (W + 2p_w)` grid and a restriction to
    the valid outputs. The circular convolution is block-diagonalised by the 2-D DFT, so its norm
    is :math:`\max_\omega \|\hat K(\omega)\|_2` over the :math:`C_{out} \times C_{in}` blocks
    :math:`\hat K(\omega) = \sum_{a,b} K_{:,:,a,b}\, e^{-2\pi i (a\omega_1/N_1 + b\omega_2/N_2)}`.
    """
    height, width = input_size
    n1, n2 = height + 2 * padding[0], width + 2 * padding[1]
    kh, kw = weight.shape[-2:]
    if n1 < kh or n2 < kw:
        raise ValueError(
            f"kernel {kh}x{kw} is larger than the padded input {n1}x{n2}: no valid output"
        )
    with torch.no_grad():
        weight = weight.detach().double()
        if kh == 1 and kw == 1:  # the spectrum is the same matrix at every frequency
            return float(torch.linalg.matrix_norm(weight[:, :, 0, 0], 2))
        # a real kernel has a conjugate-symmetric spectrum: half the frequencies suffice
        spectrum = torch.fft.rfft2(weight, s=(n1, n2))  # (Cout, Cin, n1, n2 // 2 + 1)
        blocks = spectrum.permute(2, 3, 0, 1).reshape(-1, weight.shape[0], weight.shape[1])
        if blocks.shape[1] > blocks.shape[2]:
            blocks = blocks.transpose(1, 2)
        # largest singular value = sqrt of the largest eigenvalue of the smaller Gram matrix
        chunk = max(1, int(2**22 // (blocks.shape[1] * blocks.shape[2])))
        best = 0.0
        for start in range(0, blocks.shape[0], chunk):
            part = blocks[start:start + chunk]
            gram = part @ part.conj().transpose(1, 2)
            best = max(best, float(torch.linalg.eigvalsh(gram)[:, -1].max().clamp(min=0)))
        best = math.sqrt(best)
    return best


#: the most entries (inputs x outputs) of a convolution's dense matrix that
#: :func:`conv_operator_norm_exact` builds (64 MiB in float64)
DENSE_CONV_NORM_LIMIT = 2**23


def conv_operator_norm_exact(weight: torch.Tensor, input_size: Tuple[int, int], padding: Tuple[int, int],
                             stride: int = 1, limit: int = DENSE_CONV_NORM_LIMIT) -> Optional[float]:
    r"""The operator norm of ``conv2d(x, weight, stride, padding)`` on inputs of spatial size
    ``input_size``, from its dense matrix in float64 (columns: the convolution of each basis
    image), with a relative margin of :math:`10^{-9}` for rounding; ``None`` when the matrix
    would have more than ``limit`` entries.

    On small images the FFT bound of :func:`conv_operator_norm_bound` can exceed the norm by
    10% or more (the circular embedding adds wrap-around paths that zero padding does not have);
    this is the norm itself, so certificates of small models do not fail for want of tightness.
    """
    c_in, (height, width) = weight.shape[1], input_size
    kh, kw = weight.shape[-2:]
    out_h = (height + 2 * padding[0] - kh) // stride + 1
    out_w = (width + 2 * padding[1] - kw) // stride + 1
    n_in, n_out = c_in * height * width, weight.shape[0] * out_h * out_w
    if n_in * n_out > limit or out_h < 1 or out_w < 1:
        return None
    with torch.no_grad():
        weight = weight.detach().double()
        columns = []
        for start in range(0, n_in, 1024):  # basis images in chunks, so no n_in x n_in identity
            count = min(1024, n_in - start)
            basis = torch.zeros(count, n_in, dtype=torch.float64, device=weight.device)
            basis[torch.arange(count), torch.arange(start, start + count)] = 1.0
            out = F.conv2d(basis.view(count, c_in, height, width), weight, stride=stride, padding=padding)
            columns.append(out.reshape(count, n_out))
        matrix = torch.cat(columns)  # (n_in, n_out): the transpose of the operator
        gram = matrix.T @ matrix if n_out <= n_in else matrix @ matrix.T
        largest = float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0))
    return math.sqrt(largest) * (1 + 1e-9)

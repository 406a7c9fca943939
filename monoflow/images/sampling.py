"""Sample grids: images in [0, 1] (B, C, H, W) tiled into one PNG."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ["image_grid", "save_image_grid"]


def image_grid(images: torch.Tensor, n_columns: Optional[int] = None, padding: int = 1) -> np.ndarray:
    """Tile (B, C, H, W) images in [0, 1] into an (rows*(H+p)+p, cols*(W+p)+p, C) array."""
    if images.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    cols = n_columns or int(math.ceil(math.sqrt(b)))
    rows = int(math.ceil(b / cols))
    grid = np.ones((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.float32)
    data = images.detach().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()
    for i in range(b):
        r, q = divmod(i, cols)
        y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = data[i]
    return grid


def save_image_grid(images: torch.Tensor, path: Path, n_columns: Optional[int] = None, min_size: int = 32) -> Path:
    """Write the grid of ``images`` as a PNG (grey for one channel); images smaller than
    ``min_size`` pixels are enlarged by an integer factor (nearest neighbour) to stay visible."""
    factor = max(1, min_size // max(1, min(images.shape[-2:])))
    if factor > 1:
        images = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    grid = image_grid(images, n_columns)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if grid.shape[2] == 1:
        plt.imsave(path, grid[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        plt.imsave(path, grid)
    return path

"""Fixed 2-D sine-cosine position embeddings (MAE's), with a zero slot for the CLS token."""

from __future__ import annotations

import math

import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device="cpu") / (dim / 2.0))
    angles = positions.reshape(-1, 1).double() * omega
    # The C library's sin and cos, one angle at a time: torch's vectorized float64 kernels were
    # seen to differ in the last bit from one process to the next (about 1 run in 4 on a 2-core
    # CPU), which made a from-scratch run's fixed position embedding, and so its whole result,
    # vary between identical launches. A ViT-L grid is 100k angles: milliseconds, once.
    values = angles.flatten().tolist()
    sin = torch.tensor([math.sin(a) for a in values], dtype=torch.float64, device="cpu").view_as(angles)
    cos = torch.tensor([math.cos(a) for a in values], dtype=torch.float64, device="cpu").view_as(angles)
    return torch.cat([sin, cos], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """[grid_size**2 (+1), dim]: half the channels encode the row, half the column. Computed on
    the host whatever the default device (a model built on the meta device copies it in as a
    shape only)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64, device="cpu")
    rows, cols = torch.meshgrid(coords, coords, indexing="xy")  # MAE's grid order: w first
    embed = torch.cat([_sincos_1d(dim // 2, rows), _sincos_1d(dim // 2, cols)], dim=1)
    if cls_token:
        embed = torch.cat([torch.zeros(1, dim, dtype=torch.float64, device="cpu"), embed])
    return embed.float()

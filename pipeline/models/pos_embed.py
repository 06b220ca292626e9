"""Fixed 2-D sine-cosine position embeddings (MAE's), with a zero slot for the CLS token."""

from __future__ import annotations

import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.reshape(-1, 1).double() * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """[grid_size**2 (+1), dim]: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="xy")  # MAE's grid order: w first
    embed = torch.cat([_sincos_1d(dim // 2, rows), _sincos_1d(dim // 2, cols)], dim=1)
    if cls_token:
        embed = torch.cat([torch.zeros(1, dim, dtype=torch.float64), embed])
    return embed.float()

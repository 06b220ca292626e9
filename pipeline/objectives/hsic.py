"""Normalized HSIC (the HSIC-bottleneck's nHSIC_CCA) between two batches of features.

K_ij = exp(-|a_i - a_j|^2 / (2 sigma^2 d)) with the bandwidth scaled by the feature dimension
d; centered K~ = K H with H = I - 11^T/m; R = K~ (K~ + eps m I)^-1; nHSIC = tr(R_Z R_X) =
sum_ij (R_Z o R_X^T)_ij. Computed in float32 on the inputs' device (MIMIR's code moved it to
the CPU). Where the regularized system is singular or the value is not finite the term is 0,
decided on the device (no host sync), as MIMIR skips such terms.
"""

from __future__ import annotations

import torch


def gaussian_kernel(features: torch.Tensor, sigma: float) -> torch.Tensor:
    x = features.float().flatten(1)
    squared = (x * x).sum(dim=1)
    distances = (squared[:, None] + squared[None, :] - 2 * x @ x.T).clamp_min(0)
    return torch.exp(-distances / (2 * sigma**2 * x.shape[1]))


def _resolvent(kernel: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    m = kernel.shape[0]
    eye = torch.eye(m, device=kernel.device, dtype=kernel.dtype)
    centered = kernel - kernel.mean(dim=1, keepdim=True)  # K H: subtract each row's mean
    # R = K~ A^-1 with A = K~ + eps m I, i.e. R^T = A^-T K~^T
    solution, info = torch.linalg.solve_ex((centered + eps * m * eye).T, centered.T)
    return solution.T, info


def nhsic(z: torch.Tensor, x: torch.Tensor, sigma: float = 5.0, eps: float = 1e-5) -> torch.Tensor:
    """nHSIC_CCA(z, x) for batches z [m, ...] and x [m, ...] (flattened per sample)."""
    r_z, info_z = _resolvent(gaussian_kernel(z, sigma), eps)
    r_x, info_x = _resolvent(gaussian_kernel(x, sigma), eps)
    value = (r_z * r_x.T).sum()
    ok = (info_z == 0) & (info_x == 0) & torch.isfinite(value)
    return torch.where(ok, value, torch.zeros_like(value))

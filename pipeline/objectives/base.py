"""What the objectives share: mask noise, per-patch normalized targets, patch losses (their seeded
draws come from pipeline/randomness.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from robustmim.pipeline.models.mae import MaskedAutoencoder, patch_stats


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar, to backpropagate
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars; read at log time
    denoised: Optional[torch.Tensor] = None  # NIM: the reconstruction in [0, 1] pixel space


def mask_noise(images: torch.Tensor, model: MaskedAutoencoder, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(images.shape[0], model.patch_embed.num_patches, generator=generator, device=images.device)


def pixel_target(model: MaskedAutoencoder, images01: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """[B, L, p*p*C]: the normalized image's patches, each normalized on its own if norm_pix."""
    patches = model.patchify(model.normalize(images01))
    if not norm_pix:
        return patches
    mean, std = patch_stats(patches)
    return (patches - mean) / std


def patch_losses(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, L]: mean squared error of each patch."""
    return ((pred.float() - target.float()) ** 2).mean(dim=-1)


def masked_mean(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the hidden patches only (MAE); mask is 1 where hidden."""
    return (per_patch * mask).sum() / mask.sum()

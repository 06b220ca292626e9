"""DMAE: Gaussian noise (sigma 0.25 in [0, 1] space, no clipping) added before normalization,
75% of the noisy image's patches hidden, the clean image as target, the loss over all patches
(denoise the visible ones, inpaint the hidden ones)."""

from __future__ import annotations

import torch

from robustmim.pipeline.models.mae import MaskedAutoencoder
from robustmim.pipeline.objectives.base import ObjectiveOutput, mask_noise, patch_losses, pixel_target
from robustmim.pipeline.objectives.config import DMAEConfig
from robustmim.pipeline.randomness import gaussian_like


class DMAE:
    def __init__(self, cfg: DMAEConfig, norm_pix_loss: bool = True):
        self.cfg, self.norm_pix_loss = cfg, norm_pix_loss

    def corrupt(self, images01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return images01 + self.cfg.sigma * gaussian_like(images01, generator)

    def __call__(self, model: MaskedAutoencoder, images01: torch.Tensor, generator: torch.Generator) -> ObjectiveOutput:
        noisy = self.corrupt(images01, generator)
        out = model(model.normalize(noisy), mask_noise(images01, model, generator), self.cfg.mask_ratio)
        loss = patch_losses(out.pred, pixel_target(model, images01, self.norm_pix_loss)).mean()
        return ObjectiveOutput(loss, {"loss": loss.detach()})

"""MAE: hide 75% of the patches, reconstruct them; the loss covers the hidden patches only."""

from __future__ import annotations

import torch

from robustmim.pipeline.models.mae import MaskedAutoencoder
from robustmim.pipeline.objectives.base import ObjectiveOutput, mask_noise, masked_mean, patch_losses, pixel_target
from robustmim.pipeline.objectives.config import MAEConfig


class MAE:
    def __init__(self, cfg: MAEConfig, norm_pix_loss: bool = True):
        self.cfg, self.norm_pix_loss = cfg, norm_pix_loss

    def __call__(self, model: MaskedAutoencoder, images01: torch.Tensor, generator: torch.Generator) -> ObjectiveOutput:
        out = model(model.normalize(images01), mask_noise(images01, model, generator), self.cfg.mask_ratio)
        loss = masked_mean(patch_losses(out.pred, pixel_target(model, images01, self.norm_pix_loss)), out.mask)
        return ObjectiveOutput(loss, {"loss": loss.detach()})

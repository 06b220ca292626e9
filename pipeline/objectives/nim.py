"""NIM (NIM-MAE): a noise level drawn per image (default Gamma(25, scale 3) in 0-255 units),
Gaussian noise added to the [0, 1] image before normalization with no clipping, no masking by
default, the clean image as target, the loss over all patches. The output carries the
denoised image that the De³ defense classifies."""

from __future__ import annotations

import torch

from robustmim.pipeline.models.mae import MaskedAutoencoder
from robustmim.pipeline.objectives.base import ObjectiveOutput, mask_noise, patch_losses, pixel_target
from robustmim.pipeline.objectives.config import NIMConfig, SigmaDistribution
from robustmim.pipeline.randomness import gaussian_like, sample_gamma


class NIM:
    def __init__(self, cfg: NIMConfig, norm_pix_loss: bool = True):
        self.cfg, self.norm_pix_loss = cfg, norm_pix_loss

    def sample_sigma(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """[n] noise levels in 0-255 pixel units."""
        cfg = self.cfg
        if cfg.sigma_dist is SigmaDistribution.gamma:
            return sample_gamma(cfg.gamma_shape, cfg.gamma_scale, n, generator, device)
        if cfg.sigma_dist is SigmaDistribution.uniform:
            unit = torch.rand(n, generator=generator, device=device)
            return cfg.uniform_low + (cfg.uniform_high - cfg.uniform_low) * unit
        return torch.full((n,), cfg.fixed_sigma, device=device)

    def __call__(self, model: MaskedAutoencoder, images01: torch.Tensor, generator: torch.Generator,
                 with_denoised: bool = False) -> ObjectiveOutput:
        """The loss; `with_denoised` also returns the reconstruction in [0, 1] pixels (for
        inspection and deployment only: training never reads it, so it is not computed there)."""
        sigma = self.sample_sigma(images01.shape[0], generator, images01.device)
        noisy = images01 + (sigma / 255).view(-1, 1, 1, 1) * gaussian_like(images01, generator)
        noise = mask_noise(images01, model, generator) if self.cfg.mask_ratio > 0 else None
        out = model(model.normalize(noisy), noise, self.cfg.mask_ratio)
        target = pixel_target(model, images01, self.norm_pix_loss)
        loss = patch_losses(out.pred, target).mean()
        denoised = model.reconstruct_image(out.pred.detach(), images01, self.norm_pix_loss) if with_denoised else None
        return ObjectiveOutput(loss, {"loss": loss.detach(), "sigma_mean": sigma.mean()}, denoised)


"""MIMIR: a self-adversarial input, a clean target and a mutual-information penalty.

1. x_adv: FGSM with random start (epsilon 8/255, step 10/255, 1 step; steps configurable) in
   [0, 1] pixel space that maximizes the autoencoder's own reconstruction loss of the
   perturbed image (a fresh 75% mask, target = the perturbed image itself). No labels.
2. The masked x_adv is the input, the clean image the target (hidden patches only).
3. Plus lambda * nHSIC(encoder latent, x_adv) with lambda = 1e-5.
"""

from __future__ import annotations

import torch

from robustmim.pipeline.attacks import LINF, input_gradient, pgd, uniform_linf_start
from robustmim.pipeline.models.mae import MaskedAutoencoder
from robustmim.pipeline.objectives.base import ObjectiveOutput, mask_noise, masked_mean, patch_losses, pixel_target
from robustmim.pipeline.objectives.config import MIMIRConfig
from robustmim.pipeline.objectives.hsic import nhsic
from robustmim.pipeline.randomness import uniform_like


class MIMIR:
    def __init__(self, cfg: MIMIRConfig, norm_pix_loss: bool = True):
        self.cfg, self.norm_pix_loss = cfg, norm_pix_loss

    def self_reconstruction_loss(self, model: MaskedAutoencoder, images01: torch.Tensor,
                                 generator: torch.Generator) -> torch.Tensor:
        out = model(model.normalize(images01), mask_noise(images01, model, generator), self.cfg.mask_ratio)
        return masked_mean(patch_losses(out.pred, pixel_target(model, images01, self.norm_pix_loss)), out.mask)

    def perturb(self, model: MaskedAutoencoder, images01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        start = uniform_linf_start(images01, cfg.epsilon, uniform_like(images01, generator))
        return pgd(input_gradient(lambda adv: self.self_reconstruction_loss(model, adv, generator)), images01, start,
                   LINF, cfg.epsilon, cfg.step_size, cfg.steps)

    def __call__(self, model: MaskedAutoencoder, images01: torch.Tensor, generator: torch.Generator) -> ObjectiveOutput:
        adv = self.perturb(model, images01, generator)
        out = model(model.normalize(adv), mask_noise(images01, model, generator), self.cfg.mask_ratio)
        target = pixel_target(model, images01, self.norm_pix_loss)
        reconstruction = masked_mean(patch_losses(out.pred, target), out.mask)
        penalty = nhsic(out.latent, adv, self.cfg.hsic_sigma, self.cfg.hsic_eps)
        loss = reconstruction + self.cfg.hsic_weight * penalty
        return ObjectiveOutput(loss, {"loss": loss.detach(), "reconstruction": reconstruction.detach(),
                                      "nhsic": penalty.detach()})

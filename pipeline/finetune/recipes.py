"""The fine-tuning recipes: `recipe(module, images01, labels, generator) -> (loss, metrics)`.

`module` is the FinetuneModule DeepSpeed wraps (`module.model` the classifier, `module.denoiser`
De³'s frozen NIM autoencoder, `module.tokenizer` DAT's frozen VQGAN). Every draw comes from the
step's generator. Order of operations follows each method's code: erasing is part of the image
transform (before anything else); DMAE adds its noise before mixup; NIM adds its noise after mixup.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from pipeline.attacks import L2, LINF, input_gradient, normalized_l2, pgd, uniform_linf_start
from pipeline.engine.config import Precision, uses_bf16
from pipeline.finetune.config import RecipeConfig, RecipeName
from pipeline.finetune.mixing import BatchMixer, random_erase, soft_cross_entropy
from pipeline.models.deployed import denoise
from pipeline.models.vqgan import reconstruct
from pipeline.randomness import gaussian_like, uniform_like


class Recipe:
    def __init__(self, cfg: RecipeConfig, num_classes: int):
        self.cfg = cfg
        self.mixer = BatchMixer(cfg.mixup, num_classes, cfg.label_smoothing)

    def erase(self, module, images01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        model = module.model
        return random_erase(images01, self.cfg.random_erasing, model.pixel_mean, model.pixel_std, generator)


class Standard(Recipe):
    """MAE: erasing, mixup / cutmix with label smoothing, soft-target cross-entropy."""

    def __call__(self, module, images01, labels, generator):
        inputs, targets = self.mixer(self.erase(module, images01, generator), labels, generator)
        loss = soft_cross_entropy(module.model(inputs), targets)
        return loss, {"loss": loss.detach()}


class DenoisedTraining(Recipe):
    """NIM De³: noise with sigma ~ U(low, high) per image after mixup, denoised by the frozen
    NIM autoencoder (no gradient), clamped to [0, 1], classified."""

    def __call__(self, module, images01, labels, generator):
        cfg = self.cfg.de3
        inputs, targets = self.mixer(self.erase(module, images01, generator), labels, generator)
        u = torch.rand(inputs.shape[0], generator=generator, device=inputs.device)
        sigma = (cfg.train_sigma_low + (cfg.train_sigma_high - cfg.train_sigma_low) * u) / 255
        noisy = inputs + sigma.view(-1, 1, 1, 1) * gaussian_like(inputs, generator)
        with torch.no_grad():
            denoised = denoise(module.denoiser, noisy, sigma, module.denoiser_norm_pix).clamp(0, 1)
        loss = soft_cross_entropy(module.model(denoised), targets)
        return loss, {"loss": loss.detach()}


class NoisyConsistency(Recipe):
    """DMAE: each image in `copies` Gaussian-noised copies at sigma (noise before mixup, both
    copies with the same partner), soft cross-entropy over all copies, plus
    lambda * mean_i KL(p_mean || p_i) + eta * H(p_mean) (Jeong & Shin 2020)."""

    def __call__(self, module, images01, labels, generator):
        cfg = self.cfg.dmae
        copies = cfg.copies
        repeated = self.erase(module, images01.repeat_interleave(copies, dim=0), generator)
        noisy = repeated + cfg.sigma * gaussian_like(repeated, generator)
        inputs, targets = self.mixer(noisy, labels.repeat_interleave(copies, dim=0), generator)
        logits = module.model(inputs).float()
        loss = classification = soft_cross_entropy(logits, targets)
        metrics = {"classification": classification.detach()}
        if cfg.consistency:
            log_probs = F.log_softmax(logits, dim=-1).view(images01.shape[0], copies, -1)
            mean_probs = log_probs.exp().mean(dim=1)
            log_mean = mean_probs.clamp_min(1e-12).log()
            kl = (mean_probs.unsqueeze(1) * (log_mean.unsqueeze(1) - log_probs)).sum(-1).mean()
            entropy = -(mean_probs * log_mean).sum(-1).mean()
            loss = loss + cfg.consistency_weight * kl + cfg.eta * entropy
            metrics.update(consistency_kl=kl.detach(), entropy=entropy.detach())
        metrics["loss"] = loss.detach()
        return loss, metrics


class AdversarialTraining(Recipe):
    """MIMIR: PGD in L-inf on the (mixed) batch against the current model, cross-entropy on the
    adversarial images only."""

    def __call__(self, module, images01, labels, generator):
        cfg = self.cfg.mimir
        inputs, targets = self.mixer(self.erase(module, images01, generator), labels, generator)
        start = uniform_linf_start(inputs, cfg.epsilon, uniform_like(inputs, generator)) if cfg.random_start else inputs
        adv = pgd(input_gradient(lambda x: soft_cross_entropy(module.model(x), targets)), inputs, start, LINF,
                  cfg.epsilon, cfg.step_size, cfg.steps)
        loss = soft_cross_entropy(module.model(adv), targets)
        return loss, {"loss": loss.detach()}


class DiscreteAdversarial(Recipe):
    """DAT: cross-entropy on the (mixed) clean batch plus, with equal weight, on its discrete
    adversarial version: x_q = VQ(x); one L2 ascent step from x_q (or, with probability 0.8 per
    batch, from a random point on the epsilon-sphere around it) with the gradient taken at the
    classifier's input, i.e. straight through the quantizer; projected to the ball around x_q and
    [0, 1]; re-quantized. The model stays in train mode for the attack, as in DAT's code; the
    attack takes input gradients only, so the parameter gradients come from the final loss alone."""

    def perturb(self, module, quantized: torch.Tensor, targets: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        """The perturbed image before re-quantization: within epsilon (L2) of `quantized`, in [0, 1]."""
        cfg = self.cfg.dat
        direction = normalized_l2(gaussian_like(quantized, generator))
        # One draw per batch (the attacker decides its random start per call), kept on the device.
        draw = torch.rand((), generator=generator, device=quantized.device)
        start = (draw < cfg.random_start_prob).to(quantized.dtype)
        adv = (quantized + start * cfg.epsilon * direction).clamp(0, 1)
        return pgd(input_gradient(lambda x: soft_cross_entropy(module.model(x), targets)), quantized, adv, L2,
                   cfg.epsilon, cfg.step_size, steps=1)

    def discretize(self, module, images01: torch.Tensor) -> torch.Tensor:
        """VQ(x) through the frozen tokenizer, in the images' dtype, at recipe.dat.tokenizer_precision."""
        with torch.no_grad(), round_trip_precision(self.cfg.dat.tokenizer_precision, images01.device):
            return reconstruct(module.tokenizer, images01).to(images01.dtype)

    def __call__(self, module, images01, labels, generator):
        inputs, targets = self.mixer(self.erase(module, images01, generator), labels, generator)
        clean = soft_cross_entropy(module.model(inputs), targets)
        quantized = self.discretize(module, inputs)
        perturbed = self.perturb(module, quantized, targets, generator)
        discrete = self.discretize(module, perturbed)
        adversarial = soft_cross_entropy(module.model(discrete), targets)
        loss = clean + self.cfg.dat.adversarial_weight * adversarial
        return loss, {"loss": loss.detach(), "clean": clean.detach(), "adversarial": adversarial.detach()}


def round_trip_precision(precision: Precision, device: torch.device):
    """The autocast context of DAT's frozen-tokenizer round trips; auto (or bf16_native on a CPU
    without bf16 instructions) leaves the training step's own autocast as it is."""
    if precision is Precision.fp32:
        return torch.autocast(device.type, enabled=False)
    if precision is not Precision.auto and uses_bf16(precision, device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


RECIPES = {RecipeName.standard: Standard, RecipeName.de3: DenoisedTraining,
           RecipeName.dmae: NoisyConsistency, RecipeName.mimir: AdversarialTraining,
           RecipeName.dat: DiscreteAdversarial}


def build_recipe(cfg: RecipeConfig, num_classes: int) -> Recipe:
    return RECIPES[cfg.name](cfg, num_classes)

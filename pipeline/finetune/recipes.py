"""The fine-tuning recipes: `recipe(classifier, images01, labels, generator) -> (loss, metrics)`.

A recipe owns what its method adds around the classifier: the loss, its cost in FLOPs, what it
deploys, and the frozen networks it runs the images through (De³'s NIM denoiser, DAT's VQGAN
tokenizer). Those stay outside the module DeepSpeed wraps: no optimizer state, no ZeRO
partitioning, nothing of them in the checkpoints (a ViT-L denoiser would add 1.2 GB to each);
they are loaded from their files when the recipe is built, so a bad file fails before any
training work. Every draw comes from the step's generator. Order of operations follows each
method's code: erasing is part of the image transform (before anything else); DMAE adds its
noise before mixup; NIM adds its noise after mixup.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustmim.pipeline.attacks import L2, LINF, input_gradient, normalized_l2, pgd, uniform_linf_start
from robustmim.pipeline.engine.config import Precision, uses_bf16
from robustmim.pipeline.finetune.config import RecipeConfig, RecipeName
from robustmim.pipeline.finetune.mixing import BatchMixer, random_erase, soft_cross_entropy
from robustmim.pipeline.flops import PassFlops, autoencoder_pass, vqgan_flops
from robustmim.pipeline.models.classifier import ViTClassifier
from robustmim.pipeline.models.deployed import DefenseKind, DeployedModel, denoise, deployed_model
from robustmim.pipeline.models.mae import MaskedAutoencoder
from robustmim.pipeline.models.vqgan import VQGAN, check_input, reconstruct
from robustmim.pipeline.pretrain.export import load_denoiser
from robustmim.pipeline.randomness import gaussian_like, uniform_like
from robustmim.pipeline.tokenizer.export import load_tokenizer


def frozen(network: nn.Module) -> nn.Module:
    """Eval mode (no dropout or drop path) and no gradients, for good."""
    return network.eval().requires_grad_(False)


class Recipe:
    """MAE's recipe (the base of the others): erasing, mixup / cutmix with label smoothing,
    soft-target cross-entropy; the classifier alone is deployed."""

    def __init__(self, cfg: RecipeConfig, num_classes: int):
        self.cfg = cfg
        self.mixer = BatchMixer(cfg.mixup, num_classes, cfg.label_smoothing)

    @classmethod
    def from_config(cls, cfg: RecipeConfig, num_classes: int) -> "Recipe":
        """The recipe, with its frozen networks loaded from the files its config names."""
        return cls(cfg, num_classes)

    def frozen_networks(self) -> list[nn.Module]:
        return []

    def to(self, device: torch.device) -> "Recipe":
        for network in self.frozen_networks():
            network.to(device)
        return self

    def check_input(self, image_size: int, channels: int) -> None:
        """A UserError if the frozen networks cannot take the data's images."""

    def deploy(self, classifier: ViTClassifier) -> DeployedModel:
        """The model as the eval stage rebuilds it from the export (the same constructor)."""
        defense, sigma = deployment_of(self.cfg)
        return deployed_model(defense, classifier, sigma)

    def flops_per_image(self, classifier: PassFlops, image_size: int, attention_backward: float) -> float:
        """Matmul FLOPs of one training step per image (the classifier's pass given)."""
        return classifier.training(attention_backward)

    def erase(self, classifier: ViTClassifier, images01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_erase(images01, self.cfg.random_erasing, classifier.pixel_mean, classifier.pixel_std,
                            generator)

    def __call__(self, classifier, images01, labels, generator):
        inputs, targets = self.mixer(self.erase(classifier, images01, generator), labels, generator)
        loss = soft_cross_entropy(classifier(inputs), targets)
        return loss, {"loss": loss.detach()}


def deployment_of(recipe: RecipeConfig) -> tuple[DefenseKind, float]:
    """What a recipe deploys: its defense and that defense's sigma in [0, 1] pixels (from the
    config alone, for the export's JSON)."""
    if recipe.name is RecipeName.de3:
        return DefenseKind.denoise, recipe.de3.deploy_sigma / 255
    if recipe.name is RecipeName.dmae:
        return DefenseKind.smoothing, recipe.dmae.sigma
    return DefenseKind.none, 0.0


class DenoisedTraining(Recipe):
    """NIM De³: noise with sigma ~ U(low, high) per image after mixup, denoised by the frozen
    NIM autoencoder (no gradient), clamped to [0, 1], classified. Deploys denoise-then-classify."""

    def __init__(self, cfg: RecipeConfig, num_classes: int, denoiser: MaskedAutoencoder, norm_pix: bool):
        super().__init__(cfg, num_classes)
        self.denoiser, self.norm_pix = frozen(denoiser), norm_pix

    @classmethod
    def from_config(cls, cfg: RecipeConfig, num_classes: int) -> "DenoisedTraining":
        return cls(cfg, num_classes, *load_denoiser(cfg.de3.denoiser))

    def frozen_networks(self) -> list[nn.Module]:
        return [self.denoiser]

    def deploy(self, classifier: ViTClassifier) -> DeployedModel:
        defense, sigma = deployment_of(self.cfg)
        return deployed_model(defense, classifier, sigma, self.denoiser, self.norm_pix)

    def flops_per_image(self, classifier: PassFlops, image_size: int, attention_backward: float) -> float:
        return classifier.training(attention_backward) + autoencoder_pass(self.denoiser.cfg, 0.0).forward

    def __call__(self, classifier, images01, labels, generator):
        cfg = self.cfg.de3
        inputs, targets = self.mixer(self.erase(classifier, images01, generator), labels, generator)
        u = torch.rand(inputs.shape[0], generator=generator, device=inputs.device)
        sigma = (cfg.train_sigma_low + (cfg.train_sigma_high - cfg.train_sigma_low) * u) / 255
        noisy = inputs + sigma.view(-1, 1, 1, 1) * gaussian_like(inputs, generator)
        with torch.no_grad():
            denoised = denoise(self.denoiser, noisy, sigma, self.norm_pix).clamp(0, 1)
        loss = soft_cross_entropy(classifier(denoised), targets)
        return loss, {"loss": loss.detach()}


class NoisyConsistency(Recipe):
    """DMAE: each image in `copies` Gaussian-noised copies at sigma (noise before mixup, both
    copies with the same partner), soft cross-entropy over all copies, plus
    lambda * mean_i KL(p_mean || p_i) + eta * H(p_mean) (Jeong & Shin 2020). Deploys the base
    classifier of randomized smoothing at sigma."""

    def flops_per_image(self, classifier: PassFlops, image_size: int, attention_backward: float) -> float:
        return self.cfg.dmae.copies * classifier.training(attention_backward)

    def __call__(self, classifier, images01, labels, generator):
        cfg = self.cfg.dmae
        copies = cfg.copies
        repeated = self.erase(classifier, images01.repeat_interleave(copies, dim=0), generator)
        noisy = repeated + cfg.sigma * gaussian_like(repeated, generator)
        inputs, targets = self.mixer(noisy, labels.repeat_interleave(copies, dim=0), generator)
        logits = classifier(inputs).float()
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

    def flops_per_image(self, classifier: PassFlops, image_size: int, attention_backward: float) -> float:
        return classifier.training(attention_backward) + self.cfg.mimir.steps * classifier.input_gradient(
            attention_backward)

    def __call__(self, classifier, images01, labels, generator):
        cfg = self.cfg.mimir
        inputs, targets = self.mixer(self.erase(classifier, images01, generator), labels, generator)
        start = uniform_linf_start(inputs, cfg.epsilon, uniform_like(inputs, generator)) if cfg.random_start else inputs
        adv = pgd(input_gradient(lambda x: soft_cross_entropy(classifier(x), targets)), inputs, start, LINF,
                  cfg.epsilon, cfg.step_size, cfg.steps)
        loss = soft_cross_entropy(classifier(adv), targets)
        return loss, {"loss": loss.detach()}


class DiscreteAdversarial(Recipe):
    """DAT: cross-entropy on the (mixed) clean batch plus, with equal weight, on its discrete
    adversarial version: x_q = VQ(x); one L2 ascent step from x_q (or, with probability 0.8 per
    batch, from a random point on the epsilon-sphere around it) with the gradient taken at the
    classifier's input, i.e. straight through the quantizer; projected to the ball around x_q and
    [0, 1]; re-quantized. The model stays in train mode for the attack, as in DAT's code; the
    attack takes input gradients only, so the parameter gradients come from the final loss alone.
    The tokenizer is for training only: the classifier is deployed alone."""

    def __init__(self, cfg: RecipeConfig, num_classes: int, tokenizer: VQGAN):
        super().__init__(cfg, num_classes)
        self.tokenizer = frozen(tokenizer)

    @classmethod
    def from_config(cls, cfg: RecipeConfig, num_classes: int) -> "DiscreteAdversarial":
        return cls(cfg, num_classes, load_tokenizer(cfg.dat.tokenizer, cfg.dat.tokenizer_preset))

    def frozen_networks(self) -> list[nn.Module]:
        return [self.tokenizer]

    def check_input(self, image_size: int, channels: int) -> None:
        check_input(self.tokenizer.cfg, image_size, channels, "recipe.dat.tokenizer")

    def flops_per_image(self, classifier: PassFlops, image_size: int, attention_backward: float) -> float:
        """Two training passes (clean, discrete), the attack step, two VQGAN round trips."""
        return (2 * classifier.training(attention_backward) + classifier.input_gradient(attention_backward)
                + 2 * vqgan_flops(self.tokenizer.cfg, image_size, train=False))

    def perturb(self, classifier, quantized: torch.Tensor, targets: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        """The perturbed image before re-quantization: within epsilon (L2) of `quantized`, in [0, 1]."""
        cfg = self.cfg.dat
        direction = normalized_l2(gaussian_like(quantized, generator))
        # One draw per batch (the attacker decides its random start per call), kept on the device.
        draw = torch.rand((), generator=generator, device=quantized.device)
        start = (draw < cfg.random_start_prob).to(quantized.dtype)
        adv = (quantized + start * cfg.epsilon * direction).clamp(0, 1)
        return pgd(input_gradient(lambda x: soft_cross_entropy(classifier(x), targets)), quantized, adv, L2,
                   cfg.epsilon, cfg.step_size, steps=1)

    def discretize(self, images01: torch.Tensor) -> torch.Tensor:
        """VQ(x) through the frozen tokenizer, in the images' dtype, at recipe.dat.tokenizer_precision."""
        with torch.no_grad(), round_trip_precision(self.cfg.dat.tokenizer_precision, images01.device):
            return reconstruct(self.tokenizer, images01).to(images01.dtype)

    def __call__(self, classifier, images01, labels, generator):
        inputs, targets = self.mixer(self.erase(classifier, images01, generator), labels, generator)
        clean = soft_cross_entropy(classifier(inputs), targets)
        quantized = self.discretize(inputs)
        perturbed = self.perturb(classifier, quantized, targets, generator)
        discrete = self.discretize(perturbed)
        adversarial = soft_cross_entropy(classifier(discrete), targets)
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


RECIPES = {RecipeName.standard: Recipe, RecipeName.de3: DenoisedTraining,
           RecipeName.dmae: NoisyConsistency, RecipeName.mimir: AdversarialTraining,
           RecipeName.dat: DiscreteAdversarial}


def build_recipe(cfg: RecipeConfig, num_classes: int) -> Recipe:
    """The recipe `cfg.name` names, its frozen networks loaded (on the CPU; `to` moves them)."""
    return RECIPES[cfg.name].from_config(cfg, num_classes)

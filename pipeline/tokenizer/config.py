"""`robustmim tokenizer`'s configuration: the engine's, plus the VQGAN and its losses."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from robustmim.pipeline.data.accounting import RunLength
from robustmim.pipeline.engine.config import EngineConfig, OptimConfig, ValidationConfig
from robustmim.pipeline.models.config import VQGANConfig


class Reconstruction(enum.Enum):
    l1 = "l1"  # taming's pixel term
    l2 = "l2"


@dataclass
class TokenizerLossConfig:
    """reconstruction + perceptual_weight * LPIPS + codebook_weight * (||sg[z] - e||^2 + beta ||z - sg[e]||^2)
    (+ adversarial_weight [* taming's adaptive factor] * hinge GAN loss against a PatchGAN
    discriminator from `adversarial_start_step` on). The perceptual and adversarial terms are
    off by default: LPIPS needs pretrained VGG16 weights the user brings, and for a small
    tokenizer the GAN term rarely pays."""

    reconstruction: Reconstruction = Reconstruction.l1  # the pixel loss: l1 (taming) or l2
    codebook_weight: float = 1.0  # weight of the codebook (VQ) loss
    beta: float = 0.25  # commitment weight inside the VQ loss (taming: 0.25)
    perceptual_weight: float = 0.0  # taming: 1.0
    # LPIPS weight files (pipeline/models/lpips.py): a taming VQGAN checkpoint, or torchvision's
    # VGG16 state dict plus LPIPS' vgg.pth linear heads.
    perceptual_weights: list[str] = field(default_factory=list)
    adversarial_weight: float = 0.0  # weight of the hinge GAN term (taming: 0.8); 0: no discriminator
    # taming's calculate_adaptive_weight: scale the generator's GAN term by
    # ||grad nll|| / ||grad gan|| at the decoder's last layer (clamped to [0, 1e4]).
    adaptive_adversarial_weight: bool = False
    adversarial_start_step: int = 0  # optimizer steps before the GAN terms switch on
    discriminator_layers: int = 2  # PatchGAN depth (taming: 3 for 256-px images)
    discriminator_width: int = 64  # channels of the PatchGAN discriminator's first layer

    def __post_init__(self) -> None:
        if min(self.codebook_weight, self.beta, self.perceptual_weight, self.adversarial_weight,
               self.adversarial_start_step) < 0:
            raise ValueError("loss.codebook_weight, beta, perceptual_weight, adversarial_weight and "
                             "adversarial_start_step must be >= 0")
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            raise ValueError("loss.perceptual_weight > 0 needs loss.perceptual_weights: LPIPS weight files (a taming "
                             "VQGAN checkpoint, or torchvision's VGG16 state dict plus LPIPS' vgg.pth)")
        if self.adaptive_adversarial_weight and self.adversarial_weight == 0:
            raise ValueError("loss.adaptive_adversarial_weight scales the GAN term: set loss.adversarial_weight > 0")
        if self.discriminator_layers < 1 or self.discriminator_width < 1:
            raise ValueError("loss.discriminator_layers and discriminator_width must be >= 1")


@dataclass
class TokenizerOptimConfig(OptimConfig):
    base_lr: float = 1.15e-3  # taming's 4.5e-6 per image, in our lr = base_lr * global_batch / 256
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # taming's Adam betas
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0


@dataclass
class TokenizerConfig(EngineConfig):
    hashed_sections: ClassVar[tuple[str, ...]] = EngineConfig.hashed_sections + ("model", "loss")

    model: VQGANConfig = field(default_factory=VQGANConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # reconstruction error, code usage
    optim: TokenizerOptimConfig = field(default_factory=TokenizerOptimConfig)
    length: RunLength = field(default_factory=lambda: RunLength(epochs=10))
    global_batch: int = 256
    micro_batch: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss.adaptive_adversarial_weight and self.zero_stage == 3:
            # The factor differentiates with respect to the decoder's last weight, which ZeRO-3
            # keeps partitioned outside that layer's own forward and backward.
            raise ValueError("loss.adaptive_adversarial_weight needs zero_stage <= 2 (got 3)")
        if self.loss.perceptual_weight > 0 and self.data.image_size < 16:
            # VGG16 halves the image four times before LPIPS' last stage.
            raise ValueError(f"loss.perceptual_weight > 0 needs data.image_size >= 16 (got {self.data.image_size})")

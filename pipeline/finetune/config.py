"""`robustmim finetune` configuration: the classifier, its initialization, the recipe and
validation, on the engine settings shared with pretraining. Defaults are MAE's ViT-L recipe."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from robustmim.pipeline.data.accounting import RunLength
from robustmim.pipeline.engine.config import EngineConfig, OptimConfig, Precision, ValidationConfig
from robustmim.pipeline.models.config import ClassifierConfig


class RecipeName(enum.Enum):
    standard = "standard"  # MAE's fine-tuning
    de3 = "de3"  # NIM: classify images denoised by the frozen NIM autoencoder
    dmae = "dmae"  # DMAE: Gaussian-noise training with consistency regularization, per sigma
    mimir = "mimir"  # MIMIR: PGD adversarial training
    dat = "dat"  # DAT: clean + discrete adversarial images through a frozen VQGAN


@dataclass
class MixupConfig:
    """Batch-mode mixup / cutmix as timm's Mixup (one lambda and one partner per batch)."""

    mixup_alpha: float = 0.8  # 0 disables mixup
    cutmix_alpha: float = 1.0  # 0 disables cutmix
    switch_prob: float = 0.5  # with both on: the chance of cutmix instead of mixup
    prob: float = 1.0  # the chance that a batch is mixed at all

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("recipe.mixup.mixup_alpha and cutmix_alpha must be >= 0")
        if not (0 <= self.switch_prob <= 1 and 0 <= self.prob <= 1):
            raise ValueError("recipe.mixup.switch_prob and prob must be in [0, 1]")

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass
class De3Config:
    denoiser: str = ""  # the NIM pretraining export (.safetensors with its .json)
    # Training noise per image, sigma ~ U(low, high) in 0-255 pixel units (NIM's U(0, 30)).
    train_sigma_low: float = 0.0
    train_sigma_high: float = 30.0  # upper end of that range
    # The deployed test noise (0-255 units): validation and the export; NIM validates at 70.
    deploy_sigma: float = 70.0

    def __post_init__(self) -> None:
        if not 0 <= self.train_sigma_low <= self.train_sigma_high or self.deploy_sigma < 0:
            raise ValueError("recipe.de3 needs 0 <= train_sigma_low <= train_sigma_high and deploy_sigma >= 0")


@dataclass
class DMAERecipeConfig:
    sigma: float = 0.25  # [0, 1] pixel units; one classifier per sigma (0.25, 0.5, 1.0)
    consistency: bool = True  # Jeong & Shin's consistency regularization
    copies: int = 2  # noisy copies per image (m)
    consistency_weight: float = 2.0  # lambda on the KL to the mean prediction
    entropy_weight: Optional[float] = None  # eta; None: 0.5 for sigma < 1, 0.1 at sigma >= 1 (DMAE)

    def __post_init__(self) -> None:
        if self.sigma <= 0:
            raise ValueError(f"recipe.dmae.sigma must be positive, got {self.sigma}")
        if self.copies < 1 or (self.consistency and self.copies < 2):
            raise ValueError("recipe.dmae.copies must be >= 2 with consistency (>= 1 without)")

    @property
    def eta(self) -> float:
        if self.entropy_weight is not None:
            return self.entropy_weight
        return 0.5 if self.sigma < 1.0 else 0.1


@dataclass
class AdversarialConfig:
    """PGD adversarial training in L-inf, [0, 1] space (MIMIR: ImageNet 1 step of 5/255 at
    epsilon 4/255; small images 10 steps of 2/255 at 8/255)."""

    epsilon: float = 4 / 255  # L-inf budget, [0, 1] pixels
    step_size: float = 5 / 255  # PGD step
    steps: int = 1  # PGD steps per training batch
    random_start: bool = True  # start from a uniform point in the ball

    def __post_init__(self) -> None:
        if self.epsilon <= 0 or self.step_size <= 0 or self.steps < 1:
            raise ValueError("recipe.mimir needs epsilon > 0, step_size > 0 and steps >= 1")


@dataclass
class DATConfig:
    """DAT (easyrobust's dat/main.py): one L2 step at the VQGAN reconstruction, re-quantized."""

    tokenizer: str = ""  # `robustmim export` of a tokenizer run, or a taming-transformers checkpoint
    tokenizer_preset: str = ""  # the architecture of a taming checkpoint (f16_1024, f16_16384, f8_16384)
    epsilon: float = 0.1  # L2 radius in [0, 1] pixels, around the reconstruction
    step_size: float = 0.1  # the L2 step (one step: easyrobust's 0.1)
    random_start_prob: float = 0.8  # chance per batch of starting at a random point on the sphere
    adversarial_weight: float = 1.0  # on the cross-entropy of the discrete adversarial images
    # The precision of the frozen VQGAN's two round trips per step. auto: as the training step
    # (precision); bf16 / bf16_native: under bf16 autocast (bf16_native: where the hardware computes
    # bf16) even when training runs in fp32: convolutions are ~2x faster in bf16 on CPUs with AMX
    # (78 vs 155 ms per 32 images on one core here), where the ViT's small matmuls are not;
    # fp32: in fp32 even under a bf16 training step.
    tokenizer_precision: Precision = Precision.auto

    def __post_init__(self) -> None:
        if self.epsilon <= 0 or self.step_size <= 0 or self.adversarial_weight < 0:
            raise ValueError("recipe.dat needs epsilon > 0, step_size > 0 and adversarial_weight >= 0")
        if not 0 <= self.random_start_prob <= 1:
            raise ValueError(f"recipe.dat.random_start_prob must be in [0, 1], got {self.random_start_prob}")
        if self.tokenizer_precision is Precision.bf16_weights:
            raise ValueError("recipe.dat.tokenizer_precision: bf16_weights is a training mode; the tokenizer is "
                             "frozen (auto, fp32, bf16 or bf16_native)")


@dataclass
class RecipeConfig:
    name: RecipeName = RecipeName.standard  # standard (MAE's), de3, dmae, mimir or dat; each has its section
    label_smoothing: float = 0.1  # of the cross-entropy targets
    mixup: MixupConfig = field(default_factory=MixupConfig)
    random_erasing: float = 0.25  # per-image probability (timm's pixel mode)
    de3: De3Config = field(default_factory=De3Config)
    dmae: DMAERecipeConfig = field(default_factory=DMAERecipeConfig)
    mimir: AdversarialConfig = field(default_factory=AdversarialConfig)
    dat: DATConfig = field(default_factory=DATConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.random_erasing <= 1:
            raise ValueError("recipe.label_smoothing must be in [0, 1) and random_erasing in [0, 1]")
        if self.name is RecipeName.de3 and not self.de3.denoiser:
            raise ValueError("recipe de3 needs recipe.de3.denoiser: the NIM pretraining export")
        if self.name is RecipeName.dat and not self.dat.tokenizer:
            raise ValueError("recipe dat needs recipe.dat.tokenizer: a tokenizer export or a taming checkpoint")


@dataclass
class FinetuneOptimConfig(OptimConfig):
    base_lr: float = 1e-3  # lr = base_lr * global_batch / 256
    min_lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: float = 5.0
    layer_decay: float = 0.75  # lr scale layer_decay ** (depth + 1 - layer id); 1 disables

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class FinetuneConfig(EngineConfig):
    hashed_sections: ClassVar[tuple[str, ...]] = EngineConfig.hashed_sections + ("model", "recipe", "init")

    init: str = ""  # pretrained weights: our export or an official MAE/DMAE/MIMIR checkpoint; "": scratch
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    length: RunLength = field(default_factory=lambda: RunLength(epochs=50))
    global_batch: int = 1024
    micro_batch: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_model_input(self.model.img_size, self.model.in_chans)

"""Objective configuration: the name picks one; each has its own section with the papers' values."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ObjectiveName(enum.Enum):
    mae = "mae"
    nim = "nim"
    dmae = "dmae"
    mimir = "mimir"


class SigmaDistribution(enum.Enum):
    gamma = "gamma"
    uniform = "uniform"
    fixed = "fixed"


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75  # share of patches hidden from the encoder


@dataclass
class NIMConfig:
    # sigma per image in 0-255 pixel units; NIM's default and recommended Gamma(25, scale 3).
    sigma_dist: SigmaDistribution = SigmaDistribution.gamma
    gamma_shape: float = 25.0  # sigma_dist=gamma: shape k
    gamma_scale: float = 3.0  # sigma_dist=gamma: scale (mean sigma = k * scale = 75)
    uniform_low: float = 0.0  # sigma_dist=uniform: lowest sigma
    uniform_high: float = 150.0  # sigma_dist=uniform: highest sigma
    fixed_sigma: float = 75.0  # sigma_dist=fixed: the one sigma
    mask_ratio: float = 0.0  # NIM-MAE drops masking; configurable


@dataclass
class DMAEConfig:
    sigma: float = 0.25  # in [0, 1] pixel units (DMAE's README value; its code default is 0.5)
    mask_ratio: float = 0.75  # share of patches hidden from the encoder


@dataclass
class MIMIRConfig:
    epsilon: float = 8 / 255  # L-inf budget of the self-adversarial input, [0, 1] pixels
    step_size: float = 10 / 255  # PGD step of that attack
    steps: int = 1  # PGD steps of that attack (MIMIR: 1)
    mask_ratio: float = 0.75  # share of patches hidden from the encoder
    hsic_weight: float = 1e-5  # weight of the nHSIC penalty beside the reconstruction loss
    hsic_sigma: float = 5.0  # kernel bandwidth, scaled by the feature dimension
    hsic_eps: float = 1e-5  # ridge of the resolvent K~ (K~ + eps m I)^-1; must be > 0
    # nHSIC is computed over each micro-batch (m samples), so its value depends on the micro-batch;
    # MIMIR's runs used 512 per GPU. Pretraining warns when the micro-batch is under a quarter of that.


@dataclass
class ObjectiveConfig:
    name: ObjectiveName = ObjectiveName.mae  # mae, nim, dmae or mimir; its own section below holds its settings
    norm_pix_loss: bool = True  # per-patch normalized pixel targets (MAE's released models)
    mae: MAEConfig = field(default_factory=MAEConfig)
    nim: NIMConfig = field(default_factory=NIMConfig)
    dmae: DMAEConfig = field(default_factory=DMAEConfig)
    mimir: MIMIRConfig = field(default_factory=MIMIRConfig)

    def __post_init__(self) -> None:
        for name in ("mae", "nim", "dmae", "mimir"):
            ratio = getattr(self, name).mask_ratio
            if not 0 <= ratio < 1:
                raise ValueError(f"{name}.mask_ratio must be in [0, 1), got {ratio}")
        if self.mimir.hsic_eps <= 0 or self.mimir.hsic_sigma <= 0:
            raise ValueError(f"mimir.hsic_eps and mimir.hsic_sigma must be > 0, got {self.mimir.hsic_eps} and "
                             f"{self.mimir.hsic_sigma}")
        if self.mimir.steps < 1 or self.mimir.epsilon < 0:
            raise ValueError("mimir.steps must be >= 1 and mimir.epsilon >= 0")
        if self.dmae.sigma < 0 or self.nim.gamma_shape <= 0 or self.nim.gamma_scale <= 0:
            raise ValueError("dmae.sigma must be >= 0; nim.gamma_shape and nim.gamma_scale positive")
        if self.nim.uniform_low > self.nim.uniform_high:
            raise ValueError("nim.uniform_low must not exceed nim.uniform_high")

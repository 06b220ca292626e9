"""The models each defense deploys, behind one interface, and the export format the eval stage loads.

A deployed model maps [0, 1] images and one noise draw (a standard normal tensor of the images'
shape, drawn by the caller from its generator; None for a deterministic model) to logits;
`randomized` says whether it takes noise, `classifier` is the network inside. Fine-tuning's
validation and the evaluation call it alike, without asking which recipe made it:

- plain (MAE recipe, MIMIR, DAT): the classifier on [0, 1] images.
- De³ (NIM): add the noise at the chosen sigma, denoise with the frozen NIM autoencoder, clamp
  to [0, 1], classify. Differentiable end to end, so attacks go through the denoiser.
- randomized smoothing (DMAE): the base classifier on the image plus sigma times the noise (the
  smoothed classifier's empirical behaviour under one draw); certification calls `classifier`
  itself with its own noise and vote.

`DeploymentSpec` is the JSON written beside a classifier export: enough to rebuild exactly the
module above from files, without the training config.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from robustmim.errors import UserError
from robustmim.pipeline.models.classifier import ViTClassifier
from robustmim.pipeline.models.config import ClassifierConfig, ModelConfig
from robustmim.pipeline.models.mae import MaskedAutoencoder
from robustmim.pipeline.models.weights import load_weights
from robustmim.pipeline.randomness import gaussian_like

DEPLOYMENT_FORMAT = "robustmim-classifier/1"


def denoise(denoiser: MaskedAutoencoder, noisy01: torch.Tensor, sigma: torch.Tensor | float,
            norm_pix: bool) -> torch.Tensor:
    """NIM's denoised image in [0, 1] space (not clamped) from a noisy image and its sigma."""
    out = denoiser(denoiser.normalize(noisy01))  # every patch, no masking
    return denoiser.reconstruct_image(out.pred, noisy01, norm_pix, noise_sigma=sigma)


class DefenseKind(enum.Enum):
    none = "none"  # the classifier alone
    denoise = "denoise"  # De³: noise, NIM denoiser, classifier
    smoothing = "smoothing"  # base classifier of randomized smoothing at `sigma`


class DeployedModel(nn.Module):
    """forward(images01, noise) -> logits under that noise draw (module docstring)."""

    randomized: bool

    def __init__(self, classifier: ViTClassifier):
        super().__init__()
        self.classifier = classifier

    def draw_noise(self, images01: torch.Tensor, generator: torch.Generator) -> Optional[torch.Tensor]:
        """One noise draw for the whole batch from `generator` (None when not randomized)."""
        return gaussian_like(images01, generator) if self.randomized else None


class Plain(DeployedModel):
    randomized = False

    def forward(self, images01: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.classifier(images01)


class DenoiseThenClassify(DeployedModel):
    """De³: f(clamp(D(x + sigma * noise), 0, 1))."""

    randomized = True

    def __init__(self, denoiser: MaskedAutoencoder, classifier: ViTClassifier, sigma: float, norm_pix: bool):
        super().__init__(classifier)
        self.denoiser, self.sigma, self.norm_pix = denoiser, sigma, norm_pix
        for param in denoiser.parameters():
            param.requires_grad_(False)

    def forward(self, images01: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        noisy = images01 + self.sigma * noise
        return self.classifier(denoise(self.denoiser, noisy, self.sigma, self.norm_pix).clamp(0, 1))


class SmoothingBase(DeployedModel):
    """Randomized smoothing's base classifier under one draw of its noise: f(x + sigma * noise)."""

    randomized = True

    def __init__(self, classifier: ViTClassifier, sigma: float):
        super().__init__(classifier)
        self.sigma = sigma

    def forward(self, images01: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.classifier(images01 + self.sigma * noise)


def deployed_model(defense: DefenseKind, classifier: ViTClassifier, sigma: float,
                   denoiser: Optional[MaskedAutoencoder] = None, norm_pix: bool = True) -> DeployedModel:
    """The deployed model of a defense around its classifier (and De³'s denoiser)."""
    if defense is DefenseKind.denoise:
        if denoiser is None:
            raise ValueError("a De³ deployment needs its denoiser")
        return DenoiseThenClassify(denoiser, classifier, sigma, norm_pix)
    if defense is DefenseKind.smoothing:
        return SmoothingBase(classifier, sigma)
    return Plain(classifier)


@dataclass
class DenoiserSpec:
    weights: str  # safetensors beside the JSON, MAE key layout
    model: ModelConfig = field(default_factory=ModelConfig)
    norm_pix: bool = True


@dataclass
class DeploymentSpec:
    method: str  # the fine-tuning recipe: standard, de3, dmae, mimir, dat
    weights: str  # classifier safetensors beside the JSON
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    defense: DefenseKind = DefenseKind.none
    sigma: float = 0.0  # [0, 1] pixel units: De³'s test noise, or the smoothing noise
    denoiser: Optional[DenoiserSpec] = None
    # Inputs are [0, 1] images of classifier.img_size; normalization happens inside the model.
    input_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    format: str = DEPLOYMENT_FORMAT
    trained: dict[str, Any] = field(default_factory=dict)  # provenance: run, step, samples, recipe


def read_spec(path: str | Path) -> DeploymentSpec:
    from robustmim.config import config_from_dict

    path = Path(path)
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise UserError(f"no deployment JSON at {path} (written by `robustmim export` of a fine-tuning run)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != DEPLOYMENT_FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise UserError(f"{path}: format {found!r} is not {DEPLOYMENT_FORMAT!r} "
                        f"(a pretraining export is not a classifier)")
    trained = data.pop("trained", {})  # free-form provenance, outside the typed check
    spec = config_from_dict(DeploymentSpec, data, str(path))  # checks types, names a bad key
    spec.trained = trained
    return spec


def load_deployed(path: str | Path, device: torch.device | str = "cpu") -> tuple[DeployedModel, DeploymentSpec]:
    """The deployed model (eval mode, on `device`) and its spec, from an export's JSON."""
    spec = read_spec(path)
    folder = Path(path).parent
    classifier = ViTClassifier(spec.classifier)
    load_weights(classifier, folder / spec.weights, strict=True)
    denoiser, norm_pix = None, True
    if spec.defense is DefenseKind.denoise:
        if spec.denoiser is None:
            raise UserError(f"{path}: defense 'denoise' needs a 'denoiser' section")
        denoiser, norm_pix = MaskedAutoencoder(spec.denoiser.model), spec.denoiser.norm_pix
        load_weights(denoiser, folder / spec.denoiser.weights, strict=True)
    return deployed_model(spec.defense, classifier, spec.sigma, denoiser, norm_pix).to(device).eval(), spec

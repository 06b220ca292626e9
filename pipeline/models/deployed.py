"""The models each defense deploys, and the export format the eval stage loads.

- plain (MAE, MIMIR): the classifier on [0, 1] images.
- De³ (NIM): add Gaussian noise at a chosen sigma, denoise with the frozen NIM autoencoder,
  clamp to [0, 1], classify. One module, differentiable end to end, so attacks go through the
  denoiser; its noise comes from the caller's generator (or an explicit noise tensor).
- randomized smoothing (DMAE): the base classifier alone; the smoothing noise and the vote
  belong to the certification procedure.

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
from pipeline.models.classifier import ViTClassifier
from pipeline.models.config import ClassifierConfig, ModelConfig
from pipeline.models.mae import MaskedAutoencoder
from pipeline.models.weights import load_weights
from pipeline.randomness import gaussian_like

DEPLOYMENT_FORMAT = "robustmim-classifier/1"


def denoise(denoiser: MaskedAutoencoder, noisy01: torch.Tensor, sigma: torch.Tensor | float,
            norm_pix: bool) -> torch.Tensor:
    """NIM's denoised image in [0, 1] space (not clamped) from a noisy image and its sigma."""
    out = denoiser(denoiser.normalize(noisy01))  # every patch, no masking
    return denoiser.reconstruct_image(out.pred, noisy01, norm_pix, noise_sigma=sigma)


class DenoiseThenClassify(nn.Module):
    """De³: f(clamp(D(x + sigma * noise), 0, 1)) with one noise draw per call."""

    def __init__(self, denoiser: MaskedAutoencoder, classifier: ViTClassifier, sigma: float, norm_pix: bool):
        super().__init__()
        self.denoiser, self.classifier = denoiser, classifier
        self.sigma, self.norm_pix = sigma, norm_pix
        for param in denoiser.parameters():
            param.requires_grad_(False)

    def forward(self, images01: torch.Tensor, generator: Optional[torch.Generator] = None,
                noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        if noise is None:
            noise = gaussian_like(images01, generator)
        noisy = images01 + self.sigma * noise
        return self.classifier(denoise(self.denoiser, noisy, self.sigma, self.norm_pix).clamp(0, 1))


class DefenseKind(enum.Enum):
    none = "none"  # the classifier alone
    denoise = "denoise"  # De³: noise, NIM denoiser, classifier
    smoothing = "smoothing"  # base classifier of randomized smoothing at `sigma`


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


def load_deployed(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, DeploymentSpec]:
    """The deployed module (eval mode, on `device`) and its spec, from an export's JSON."""
    spec = read_spec(path)
    folder = Path(path).parent
    classifier = ViTClassifier(spec.classifier)
    load_weights(classifier, folder / spec.weights, strict=True)
    module: nn.Module = classifier
    if spec.defense is DefenseKind.denoise:
        if spec.denoiser is None:
            raise UserError(f"{path}: defense 'denoise' needs a 'denoiser' section")
        denoiser = MaskedAutoencoder(spec.denoiser.model)
        load_weights(denoiser, folder / spec.denoiser.weights, strict=True)
        module = DenoiseThenClassify(denoiser, classifier, spec.sigma, spec.denoiser.norm_pix)
    return module.to(device).eval(), spec

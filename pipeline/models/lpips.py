"""LPIPS (Zhang et al., 2018; VGG16 variant): the perceptual term of taming's VQGAN loss.

distance(x, y) = sum over five VGG16 stages l of mean_{h,w} w_l . (u(f_l(x)) - u(f_l(y)))^2, where
f_l is the stage's last ReLU output (relu1_2 ... relu5_3), u() scales each pixel's feature
vector to unit length and w_l is a learned non-negative 1x1 projection (the "linear heads").

Module and parameter names follow taming-transformers' and the `lpips` package's LPIPS
(`scaling_layer.shift`, `net.slice{1..5}.{torchvision index}.weight`, `lin{0..4}.model.1.weight`),
so the weights come from what users already have, and nothing is downloaded:
- a taming VQGAN checkpoint (its `loss.perceptual_loss.*` tensors are a complete LPIPS), or
- torchvision's VGG16 state dict (`features.N.*`) plus LPIPS' linear heads (`vgg.pth`, v0.1),
  or any other split of those keys over several files.
The network is frozen: it never trains and always runs in eval mode.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from robustmim.errors import UserError

# VGG16's `features` up to relu5_3: output channels, "M" for a 2x2 max pool. torchvision numbers
# each conv, ReLU and pool in turn; the LPIPS stages end after relu1_2, 2_2, 3_3, 4_3 and 5_3.
VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
STAGE_ENDS = (4, 9, 16, 23, 30)  # exclusive torchvision indices: stage k holds [STAGE_ENDS[k-1], STAGE_ENDS[k])
STAGE_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS' input normalization from [-1, 1] (its ScalingLayer): not learned, absent from most weight files.
INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)
TAMING_PREFIX = "loss.perceptual_loss."  # where a taming VQGAN checkpoint keeps its LPIPS


def vgg16_stages() -> nn.ModuleList:
    """VGG16 features as five nn.Sequential stages keeping torchvision's layer indices as names."""
    layers: list[nn.Module] = []
    channels = 3
    for entry in VGG16_PLAN:
        if entry == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, entry, 3, padding=1), nn.ReLU()]
            channels = entry
    bounds = (0,) + STAGE_ENDS
    return nn.ModuleList(nn.Sequential(OrderedDict((str(i), layers[i]) for i in range(bounds[k], bounds[k + 1])))
                         for k in range(len(STAGE_ENDS)))


class _InputScaling(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(INPUT_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(INPUT_SCALE).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.shift) / self.scale


class _VGG16Stages(nn.Module):
    def __init__(self):
        super().__init__()
        for index, stage in enumerate(vgg16_stages(), start=1):
            self.add_module(f"slice{index}", stage)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.children():
            images = stage(images)
            features.append(images)
        return features


class _LinearHead(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        # Index 0 is LPIPS' dropout, a no-op in the eval mode this network always runs in; kept so
        # the weight sits at the published name `model.1.weight`.
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, squared_difference: torch.Tensor) -> torch.Tensor:
        return self.model(squared_difference).mean(dim=(2, 3))  # [B, 1]


def _unit_length(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Perceptual distance between two batches of images in [-1, 1] (1 or 3 channels; one channel
    is repeated to three as VGG expects), one value per image."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = _InputScaling()
        self.net = _VGG16Stages()
        for index, channels in enumerate(STAGE_CHANNELS):
            self.add_module(f"lin{index}", _LinearHead(channels))
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # frozen: a parent's .train() must not switch the heads' dropout on

    def heads(self) -> list[_LinearHead]:
        return [getattr(self, f"lin{index}") for index in range(len(STAGE_CHANNELS))]

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        if first.shape != second.shape or first.dim() != 4 or first.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS takes two [B, 1 or 3, H, W] batches of one shape, got {tuple(first.shape)} "
                             f"and {tuple(second.shape)}")
        # Two passes, not one over the concatenation: autograd then backpropagates only through
        # the input that needs it (the reconstruction, not the target image).
        first_features, second_features = (self.net(self.scaling_layer(images.expand(-1, 3, -1, -1)))
                                            for images in (first, second))
        distance = first.new_zeros(first.shape[0])
        for head, ours, theirs in zip(self.heads(), first_features, second_features):
            distance = distance + head((_unit_length(ours) - _unit_length(theirs)).pow(2)).flatten()
        return distance


def _published_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One weight file's tensors under LPIPS' names: a taming checkpoint's LPIPS sub-state, or
    torchvision VGG16 keys renamed to their stage (its classifier dropped), or LPIPS' own names."""
    if any(key.startswith(TAMING_PREFIX) for key in state):
        return {key[len(TAMING_PREFIX):]: value for key, value in state.items() if key.startswith(TAMING_PREFIX)}
    renamed = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue  # torchvision VGG16's fully connected head: LPIPS does not use it
        if key.startswith("features."):
            index = int(key.split(".")[1])
            stage = next((k for k, end in enumerate(STAGE_ENDS, start=1) if index < end), None)
            if stage is not None:  # features beyond relu5_3 (the last pool) have no weights anyway
                key = f"net.slice{stage}.{key[len('features.'):]}"
        renamed[key] = value
    return renamed


def load_lpips(paths: Sequence[str | Path]) -> LPIPS:
    """LPIPS from one or more weight files (safetensors, or `torch.load(weights_only=True)`),
    which together must hold every VGG16 and linear-head tensor; the input scaling constants may
    be absent. Any key missing, unknown, given twice or of the wrong shape is an error naming it."""
    from robustmim.pipeline.models.weights import match_state, read_state_dict

    if not paths:
        raise UserError("LPIPS needs weight files: a taming VQGAN checkpoint, or torchvision's VGG16 state "
                        "dict plus LPIPS' vgg.pth linear heads")
    merged: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for path in paths:
        for key, value in _published_keys(read_state_dict(path)).items():
            if key in merged:
                raise UserError(f"LPIPS weights: {key} is in both {origin[key]} and {path}")
            merged[key], origin[key] = value, str(path)
    model = LPIPS()
    names = ", ".join(str(p) for p in paths)
    report, usable = match_state(model, merged, names)
    report.missing = [key for key in report.missing if not key.startswith("scaling_layer.")]
    if report.missing or report.unexpected or report.mismatched:
        raise UserError(f"not LPIPS (VGG16) weights: {report}")
    model.load_state_dict(usable, strict=False)
    if any(float(head.model[1].weight.min()) < 0 for head in model.heads()):
        raise UserError(f"LPIPS weights from {names}: the linear heads have negative entries; LPIPS' "
                        f"heads are non-negative (is this a different network's file?)")
    return model

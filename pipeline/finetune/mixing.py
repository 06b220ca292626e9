"""Batch augmentations of fine-tuning on the device, drawn from the step's generator (so a
resumed run repeats them): random erasing, mixup / cutmix with smoothed soft targets.

Everything stays on the device as tensors (the mixing lambda and the cutmix box included): no
host reads, so nothing waits for the GPU. timm's Mixup draws from numpy's global generator and
returns a Python float; these follow its batch mode with our seeded draws instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from robustmim.pipeline.finetune.config import MixupConfig
from robustmim.pipeline.randomness import sample_beta


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """[B, K]: 1 - smoothing + smoothing / K on the label, smoothing / K elsewhere (timm's)."""
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).float() * (1 - smoothing) + off


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def cutmix_box(height: int, width: int, lam: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[H, W] bool: a box of area about (1 - lam) at a uniform center, clipped to the image."""
    device = lam.device
    ratio = torch.sqrt(1 - lam)
    cut_h, cut_w = torch.floor(height * ratio), torch.floor(width * ratio)
    center = torch.rand(2, generator=generator, device=device)
    cy, cx = torch.floor(center[0] * height), torch.floor(center[1] * width)
    rows = torch.arange(height, device=device).view(-1, 1)
    cols = torch.arange(width, device=device).view(1, -1)
    half_h, half_w = torch.floor(cut_h / 2), torch.floor(cut_w / 2)
    top, bottom = (cy - half_h).clamp(0, height), (cy + half_h).clamp(0, height)
    left, right = (cx - half_w).clamp(0, width), (cx + half_w).clamp(0, width)
    return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


class BatchMixer:
    """Mix each image with the batch reversed (timm's batch mode); targets mix alike."""

    def __init__(self, cfg: MixupConfig, num_classes: int, smoothing: float):
        self.cfg, self.num_classes, self.smoothing = cfg, num_classes, smoothing

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        targets = smooth_one_hot(labels, self.num_classes, self.smoothing)
        cfg = self.cfg
        if not cfg.enabled:
            return images, targets
        device = images.device
        coins = torch.rand(2, generator=generator, device=device)  # [mix at all, cutmix instead of mixup]
        if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
            use_cutmix = coins[1] < cfg.switch_prob
        else:
            use_cutmix = torch.tensor(cfg.cutmix_alpha > 0, device=device)
        partner, partner_targets = images.flip(0), targets.flip(0)
        one = torch.ones((), device=device)
        lam_mix = sample_beta(cfg.mixup_alpha, generator, device) if cfg.mixup_alpha > 0 else one
        mixed = images * lam_mix + partner * (1 - lam_mix)
        if cfg.cutmix_alpha > 0:
            box = cutmix_box(images.shape[-2], images.shape[-1], sample_beta(cfg.cutmix_alpha, generator, device),
                             generator)
            cut = torch.where(box, partner, images)
            lam_cut = 1 - box.float().mean()  # the area actually kept, after clipping
        else:
            cut, lam_cut = images, one
        apply = coins[0] < cfg.prob
        lam = torch.where(apply, torch.where(use_cutmix, lam_cut, lam_mix), one)
        out = torch.where(apply, torch.where(use_cutmix, cut, mixed), images)
        return out, targets * lam + partner_targets * (1 - lam)


def random_erase(images01: torch.Tensor, prob: float, pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """timm's RandomErasing in pixel mode, one box per image with probability `prob`: area in
    [0.02, 1/3] of the image, aspect in [0.3, 1/0.3] (log-uniform), filled with per-pixel normal
    noise of the data's statistics (N(0, 1) after normalization). timm retries a box that does
    not fit up to 10 times; here its sides are clipped to the image instead (no host loop)."""
    if prob <= 0:
        return images01
    batch, _, height, width = images01.shape
    device = images01.device
    u = torch.rand(5, batch, generator=generator, device=device)
    area = (0.02 + (1 / 3 - 0.02) * u[0]) * height * width
    aspect = torch.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * u[1])
    box_h = torch.round(torch.sqrt(area * aspect)).clamp(1, height - 1)
    box_w = torch.round(torch.sqrt(area / aspect)).clamp(1, width - 1)
    top = torch.floor(u[2] * (height - box_h + 1)).view(-1, 1, 1, 1)
    left = torch.floor(u[3] * (width - box_w + 1)).view(-1, 1, 1, 1)
    rows = torch.arange(height, device=device).view(1, 1, -1, 1)
    cols = torch.arange(width, device=device).view(1, 1, 1, -1)
    box = ((rows >= top) & (rows < top + box_h.view(-1, 1, 1, 1)) & (cols >= left)
           & (cols < left + box_w.view(-1, 1, 1, 1)) & (u[4] < prob).view(-1, 1, 1, 1))
    fill = pixel_mean + pixel_std * torch.randn(images01.shape, generator=generator, device=device,
                                                dtype=images01.dtype)
    return torch.where(box, fill, images01)

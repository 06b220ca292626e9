"""AdamW with MAE's parameter groups (and layer-wise lr decay for fine-tuning), and the
per-step warmup + half-cycle cosine schedule.

Every group carries an `lr_scale`; its lr is the peak lr times that scale, and the schedule
multiplies all groups alike, so the ratios between layers hold throughout training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from robustmim.pipeline.engine.config import OptimConfig

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "decoder_pos_embed")


def decays(name: str, param: nn.Parameter) -> bool:
    """Weight decay for weight matrices; none for norms, biases (1-D), position embeddings, tokens."""
    return param.ndim > 1 and name.split(".")[-1] not in NO_DECAY_NAMES


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]


def vit_layer_id(name: str, depth: int) -> int:
    """MAE's layer ids: 0 for the embeddings and CLS token, i + 1 for block i, depth + 1 for the
    rest (final norm, head)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float, depth: int) -> list[dict]:
    """One group per (layer, decay or not) with lr_scale = layer_decay ** (depth + 1 - layer id)."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, decay = vit_layer_id(name, depth), decays(name, param)
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.base_lr * global_batch / 256


@dataclass
class WarmupCosine:
    """Multiplier of the peak lr at an optimizer step: linear warmup, then cosine to min_lr."""

    warmup_steps: int
    total_steps: int
    min_ratio: float  # min_lr / peak lr

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(groups: list[dict], cfg: OptimConfig, global_batch: int, warmup_steps: int,
                    total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `groups` (each with its lr_scale) and the schedule, stepped per optimizer step."""
    lr = peak_lr(cfg, global_batch)
    groups = [{**group, "lr": lr * group["lr_scale"]} for group in groups]
    # One fused kernel for all parameters on CUDA instead of a loop of small ones per tensor.
    on_cuda = all(p.is_cuda for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), fused=on_cuda or None)
    # min_lr is absolute: each group's floor is min_lr scaled like the group (as MAE's schedule)
    schedule = WarmupCosine(warmup_steps, total_steps, cfg.min_lr / lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

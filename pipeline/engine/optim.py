"""AdamW with MAE's parameter groups, and the per-step warmup + half-cycle cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from pipeline.engine.config import OptimConfig

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "decoder_pos_embed")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay for weight matrices; none for norms, biases (1-D), position embeddings and tokens."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int, warmup_steps: int,
                    total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    lr = peak_lr(cfg, global_batch)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=tuple(cfg.betas))
    schedule = WarmupCosine(warmup_steps, total_steps, cfg.min_lr / lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

"""What a training stage gives the engine: a module, its parameter groups, its FLOPs, and
(optionally) a validation pass. Pretraining and fine-tuning are two such tasks on one engine,
so both get the same ZeRO stages, checkpoints, exact resume, signals, metrics and Slurm launch.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from pipeline.data.shardset import ShardSet
from pipeline.dist import DistEnv
from pipeline.engine.config import EngineConfig


class TrainingTask(Protocol):
    stage: str  # "pretrain", "finetune": names the stage in provenance and metrics
    validate_every: int  # optimizer steps between validations (and at the end); 0: never
    notes: list[str]  # lines rank 0 prints after `build` (e.g. how pretrained weights loaded)

    def resolve(self, shards: ShardSet) -> EngineConfig:
        """The config with values that depend on the data filled in (e.g. the class count)."""

    def build(self, cfg: EngineConfig) -> nn.Module:
        """The module DeepSpeed wraps: forward(images01, labels, generator) -> (loss, metrics);
        its state dict holds the trained network under `model.`."""

    def param_groups(self, module: nn.Module) -> list[dict]:
        """Optimizer groups, each with `params`, `weight_decay` and `lr_scale`."""

    def flops_per_image(self, cfg: EngineConfig) -> float:
        """Matmul FLOPs of one training step per image, for MFU."""

    def validate(self, module: nn.Module, cfg: EngineConfig, env: DistEnv, device: torch.device,
                 step: int) -> dict[str, float]:
        """Collective over all ranks; {} when the stage has no validation."""

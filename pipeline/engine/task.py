"""What a training stage gives the engine: a module, its parameter groups, its FLOPs, and
(optionally) a validation pass. Pretraining, fine-tuning and the tokenizer are such tasks on one
engine, so all get the same ZeRO stages, checkpoints, exact resume, signals, metrics and Slurm
launch.

The trainer opens the training split, lets the task's class fill in what depends on the data
(`resolve`), then builds the task once with the resolved config, the rank's environment and
its device; no method takes them again. What a task has to say (how pretrained weights loaded,
a setting far from the paper's) it logs.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
import torch.nn as nn

from robustmim.pipeline.data.shardset import ShardSet
from robustmim.pipeline.dist import DistEnv
from robustmim.pipeline.engine.config import EngineConfig


class TrainingTask(Protocol):
    stage: ClassVar[str]  # "pretrain", "finetune", "tokenizer": names the stage in checkpoints and metrics
    cfg: EngineConfig  # the resolved config
    validate_every: int  # optimizer steps between validations (and at the end); 0: never

    @classmethod
    def resolve(cls, cfg: EngineConfig, shards: ShardSet) -> EngineConfig:
        """The config with values that depend on the data filled in (e.g. the class count); a
        UserError when the data does not fit it."""

    def __init__(self, cfg: EngineConfig, env: DistEnv, device: torch.device) -> None: ...

    def build(self) -> nn.Module:
        """The module DeepSpeed wraps: forward(images01, labels, generator) -> (loss, metrics);
        its state dict holds the trained network under `model.`."""

    def param_groups(self, module: nn.Module) -> list[dict]:
        """Optimizer groups, each with `params`, `weight_decay` and `lr_scale`."""

    def flops_per_image(self) -> float:
        """Matmul FLOPs of one training step per image, for MFU."""

    def validate(self, module: nn.Module, step: int) -> dict[str, float]:
        """Collective over all ranks; {} when the stage has no validation."""

"""Pretraining as an engine task: the masked autoencoder under its objective (MAE, NIM, DMAE,
MIMIR). Labels are read by the loader but unused: the objectives are self-supervised."""

from __future__ import annotations

import torch
import torch.nn as nn

from robustmim.log import get_logger
from robustmim.pipeline.data.shardset import ShardSet
from robustmim.pipeline.dist import DistEnv
from robustmim.pipeline.engine.optim import param_groups
from robustmim.pipeline.models.mae import MaskedAutoencoder
from robustmim.pipeline.objectives.config import ObjectiveName
from robustmim.pipeline.objectives.registry import build_objective
from robustmim.pipeline.pretrain.config import PretrainConfig
from robustmim.pipeline.pretrain.flops import pretraining_flops_per_image

# MIMIR's released runs: the micro-batch its nHSIC penalty saw on each GPU
MIMIR_MICRO_BATCH = 512

log = get_logger(__name__)


class PretrainModule(nn.Module):
    """What DeepSpeed wraps: the autoencoder under its objective (state dict keys `model.*`)."""

    def __init__(self, model: MaskedAutoencoder, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        out = self.objective(self.model, images, generator)
        return out.loss, out.metrics


def mimir_micro_batch_warning(cfg: PretrainConfig) -> str | None:
    """What to tell a MIMIR run whose micro-batch is far below MIMIR's own (None: nothing)."""
    if cfg.objective.name is ObjectiveName.mimir and cfg.micro_batch < MIMIR_MICRO_BATCH // 4:
        return (f"MIMIR's nHSIC term is computed over each micro-batch; at micro_batch {cfg.micro_batch} its "
                f"value is not comparable with MIMIR's runs ({MIMIR_MICRO_BATCH} per GPU)")
    return None


class PretrainTask:
    stage = "pretrain"
    validate_every = 0

    @classmethod
    def resolve(cls, cfg: PretrainConfig, shards: ShardSet) -> PretrainConfig:
        return cfg  # self-supervised: nothing depends on the data

    def __init__(self, cfg: PretrainConfig, env: DistEnv, device: torch.device):
        self.cfg = cfg
        warning = mimir_micro_batch_warning(cfg)
        if warning and env.is_main:  # the same on every rank: said once
            log.warning(f"pretrain: {warning}")

    def build(self) -> PretrainModule:
        cfg = self.cfg
        model = MaskedAutoencoder(cfg.model)
        model.set_grad_checkpointing(cfg.activation_checkpointing)
        return PretrainModule(model, build_objective(cfg.objective))

    def param_groups(self, module: PretrainModule) -> list[dict]:
        return param_groups(module.model, self.cfg.optim.weight_decay)

    def flops_per_image(self) -> float:
        cfg = self.cfg
        return pretraining_flops_per_image(cfg.model, cfg.objective, cfg.micro_batch)

    def validate(self, module: PretrainModule, step: int) -> dict[str, float]:
        return {}


def pretrain(cfg: PretrainConfig) -> dict:
    from robustmim.pipeline.engine.trainer import train

    return train(cfg, PretrainTask)

"""Pretraining as an engine task: the masked autoencoder under its objective (MAE, NIM, DMAE,
MIMIR). Labels are read by the loader but unused: the objectives are self-supervised."""

from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.data.shardset import ShardSet
from pipeline.pretrain.config import PretrainConfig
from pipeline.engine.optim import param_groups
from pipeline.flops import training_flops_per_image
from pipeline.models.mae import MaskedAutoencoder
from pipeline.objectives.config import ObjectiveName
from pipeline.objectives.registry import build_objective

# MIMIR's released runs: the micro-batch its nHSIC penalty saw on each GPU
MIMIR_MICRO_BATCH = 512


class PretrainModule(nn.Module):
    """What DeepSpeed wraps: the autoencoder under its objective (state dict keys `model.*`)."""

    def __init__(self, model: MaskedAutoencoder, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        out = self.objective(self.model, images, generator)
        return out.loss, out.metrics


class PretrainTask:
    stage = "pretrain"
    validate_every = 0

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.notes: list[str] = []
        if cfg.objective.name is ObjectiveName.mimir and cfg.micro_batch < MIMIR_MICRO_BATCH // 4:
            self.notes.append(f"warning: MIMIR's nHSIC term is computed over each micro-batch; at micro_batch "
                              f"{cfg.micro_batch} its value is not comparable with MIMIR's runs "
                              f"({MIMIR_MICRO_BATCH} per GPU)")

    def resolve(self, shards: ShardSet) -> PretrainConfig:
        return self.cfg

    def build(self, cfg: PretrainConfig) -> PretrainModule:
        model = MaskedAutoencoder(cfg.model)
        model.set_grad_checkpointing(cfg.activation_checkpointing)
        return PretrainModule(model, build_objective(cfg.objective))

    def param_groups(self, module: PretrainModule) -> list[dict]:
        return param_groups(module.model, self.cfg.optim.weight_decay)

    def flops_per_image(self, cfg: PretrainConfig) -> float:
        return training_flops_per_image(cfg.model, cfg.objective, cfg.micro_batch)

    def validate(self, module, cfg, env, device, step) -> dict[str, float]:
        return {}


def pretrain(cfg: PretrainConfig) -> dict:
    from pipeline.engine.trainer import train

    return train(cfg, PretrainTask(cfg))

"""Fine-tuning as an engine task: the classifier under its recipe, validated as deployed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from robustmim.errors import UserError
from robustmim.log import get_logger
from robustmim.pipeline.data.shardset import ShardSet, open_shards
from robustmim.pipeline.dist import DistEnv
from robustmim.pipeline.engine.optim import layer_decay_groups
from robustmim.pipeline.engine.validation import validation_batches
from robustmim.pipeline.finetune.config import FinetuneConfig
from robustmim.pipeline.finetune.recipes import Recipe, build_recipe
from robustmim.pipeline.flops import FUSED_ATTENTION_BACKWARD, classifier_pass
from robustmim.pipeline.models.classifier import ViTClassifier, load_pretrained_encoder
from robustmim.pipeline.models.deployed import DeployedModel
from robustmim.pipeline.models.vit import compile_blocks
from robustmim.pipeline.randomness import validation_generator

log = get_logger(__name__)


def with_encoder_normalization(cfg: FinetuneConfig) -> tuple[FinetuneConfig, Optional[str]]:
    """The classifier normalizes its inputs as its encoder was pretrained to see them.

    The input convention belongs to the encoder: MIMIR pretrains on raw [0, 1] pixels, MAE, DMAE and
    NIM on ImageNet-normalized ones, so one fine-tuning recipe (e.g. MIMIR's) run from either
    encoder must follow the encoder. An export from `robustmim export` records its model's
    pixel_mean and pixel_std in the JSON beside it; those win over the config's, with a note.
    Other files (official checkpoints) carry none: the config's values stand.
    """
    meta_path = Path(cfg.init).with_suffix(".json") if cfg.init else None
    if meta_path is None or not meta_path.is_file():
        return cfg, None
    pretrained = json.loads(meta_path.read_text()).get("model") or {}
    mean, std = pretrained.get("pixel_mean"), pretrained.get("pixel_std")
    if mean is None or std is None or len(mean) != cfg.model.in_chans or (mean, std) == (cfg.model.pixel_mean,
                                                                                          cfg.model.pixel_std):
        return cfg, None  # a channel mismatch is reported by the weights' own check
    note = (f"input normalization from the encoder's pretraining ({meta_path.name}): pixel_mean {mean}, pixel_std "
            f"{std} (the config had {cfg.model.pixel_mean}, {cfg.model.pixel_std})")
    model = dataclasses.replace(cfg.model, pixel_mean=list(mean), pixel_std=list(std))
    return dataclasses.replace(cfg, model=model), note



def finetune_flops_per_image(cfg: FinetuneConfig, recipe: Recipe,
                             attention_backward: float = FUSED_ATTENTION_BACKWARD) -> float:
    """FLOPs of one fine-tuning step per image: the classifier's passes and the frozen networks'
    forwards, as the recipe runs them."""
    return recipe.flops_per_image(classifier_pass(cfg.model, cfg.model.num_classes), cfg.model.img_size,
                                  attention_backward)


class FinetuneModule(nn.Module):
    """What DeepSpeed wraps: the classifier (`model.*`, all the state dict holds) under its
    recipe, whose frozen networks stay outside (pipeline/finetune/recipes.py says why)."""

    def __init__(self, model: ViTClassifier, recipe: Recipe):
        super().__init__()
        self.model, self.recipe = model, recipe  # a Recipe is no nn.Module: not registered

    def forward(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        return self.recipe(self.model, images, labels, generator)


class FinetuneTask:
    stage = "finetune"

    @classmethod
    def resolve(cls, cfg: FinetuneConfig, shards: ShardSet) -> FinetuneConfig:
        """The class count from the data (unless set), and the encoder's input normalization."""
        classes = cfg.model.num_classes or shards.num_classes
        if classes < shards.num_classes:
            raise UserError(f"model.num_classes={classes}, but {cfg.data.shards} has {shards.num_classes} classes")
        if cfg.validation.every_steps:  # fail now, not at the first validation
            open_shards(cfg.data.shards, cfg.validation.split)
        cfg, note = with_encoder_normalization(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                                                 num_classes=classes)))
        if note:
            log.info(f"finetune: {note}")
        return cfg

    def __init__(self, cfg: FinetuneConfig, env: DistEnv, device: torch.device):
        self.cfg, self.env, self.device = cfg, env, device
        self.validate_every = cfg.validation.every_steps
        # Built now, before the trainer seeds the classifier's init: a bad denoiser or tokenizer
        # file fails before any training work, and loading one draws nothing from that seed.
        self.recipe = build_recipe(cfg.recipe, cfg.model.num_classes)
        self.recipe.check_input(cfg.data.image_size, cfg.data.channels)

    def build(self) -> FinetuneModule:
        cfg = self.cfg
        model = ViTClassifier(cfg.model)
        if cfg.init:
            log.info(f"finetune: initialized from {load_pretrained_encoder(model, cfg.init)}")
        model.set_grad_checkpointing(cfg.activation_checkpointing)
        self.recipe.to(self.device)
        if cfg.compiles(self.device.type == "cuda"):  # as the trainer compiles the module's blocks
            for network in self.recipe.frozen_networks():
                compile_blocks(network)
        return FinetuneModule(model, self.recipe)

    def param_groups(self, module: FinetuneModule) -> list[dict]:
        optim = self.cfg.optim
        return layer_decay_groups(module.model, optim.weight_decay, optim.layer_decay, self.cfg.model.depth)

    def flops_per_image(self) -> float:
        return finetune_flops_per_image(self.cfg, self.recipe)

    def deployed(self, module: FinetuneModule) -> DeployedModel:
        """The model as the eval stage will load it from the export."""
        return self.recipe.deploy(module.model)

    def validate(self, module: FinetuneModule, step: int) -> dict[str, float]:
        """Top-1 of the deployed model on the validation split, each rank its exact chunk."""
        cfg, env, device = self.cfg, self.env, self.device
        generator = validation_generator(cfg.seed, step, env.rank, device)
        deployed = self.deployed(module)
        counts = torch.zeros(2, device=device, dtype=torch.float64)  # [correct, seen]
        for images, labels in validation_batches(cfg, cfg.validation, env):
            logits = deployed(images, deployed.draw_noise(images, generator))
            counts[0] += (logits.argmax(dim=-1) == labels.to(device)).sum()
            counts[1] += images.shape[0]
        dist.all_reduce(counts)
        correct, seen = counts.tolist()
        return {"val_top1": correct / max(seen, 1), "val_samples": seen}


def finetune(cfg: FinetuneConfig) -> dict:
    from robustmim.pipeline.engine.trainer import train

    return train(cfg, FinetuneTask)

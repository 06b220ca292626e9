"""Fine-tuning as an engine task: the classifier under its recipe, validated as deployed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from robustmim.config import config_from_dict
from robustmim.errors import UserError
from robustmim.log import get_logger
from pipeline.data.shardset import ShardSet, open_shards
from pipeline.dist import DistEnv
from pipeline.engine.optim import layer_decay_groups
from pipeline.engine.validation import validation_batches
from pipeline.finetune.config import FinetuneConfig, RecipeConfig, RecipeName
from pipeline.finetune.recipes import build_recipe
from pipeline.flops import FUSED_ATTENTION_BACKWARD, autoencoder_pass, classifier_pass, vqgan_flops
from pipeline.models.classifier import ViTClassifier, load_pretrained_encoder
from pipeline.models.config import ModelConfig, VQGANConfig
from pipeline.models.deployed import DefenseKind, DeployedModel, deployed_model
from pipeline.models.mae import MaskedAutoencoder
from pipeline.models.vqgan import VQGAN, check_input
from pipeline.models.weights import load_weights
from pipeline.randomness import validation_generator
from pipeline.tokenizer.export import load_tokenizer

log = get_logger(__name__)


def read_autoencoder_export(path: str | Path) -> tuple[ModelConfig, bool]:
    """(model config, norm_pix) from the JSON beside a pretraining export."""
    meta_path = Path(path).with_suffix(".json")
    if not meta_path.is_file():
        raise UserError(f"{meta_path}: missing; the denoiser must be a `robustmim export` of a NIM run "
                        f"(its JSON says how to rebuild the autoencoder)")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta.get("model"), dict):
        raise UserError(f"{meta_path}: no 'model' section")
    return config_from_dict(ModelConfig, meta["model"], f"{meta_path}: model"), bool(meta.get("norm_pix_loss", True))


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



def finetune_flops_per_image(cfg: FinetuneConfig, denoiser: ModelConfig | None = None,
                             tokenizer: VQGANConfig | None = None,
                             attention_backward: float = FUSED_ATTENTION_BACKWARD) -> float:
    """FLOPs of one fine-tuning step per image: the classifier's training pass, times the noisy
    copies (DMAE), plus the attack's input-gradient passes (MIMIR), the denoiser's forward (De³),
    or DAT's second training pass, its attack step and two VQGAN round trips."""
    classifier = classifier_pass(cfg.model, cfg.model.num_classes)
    total = classifier.training(attention_backward)
    recipe = cfg.recipe
    if recipe.name is RecipeName.dmae:
        total *= recipe.dmae.copies
    elif recipe.name is RecipeName.mimir:
        total += recipe.mimir.steps * classifier.input_gradient(attention_backward)
    elif recipe.name is RecipeName.de3 and denoiser is not None:
        total += autoencoder_pass(denoiser, 0.0).forward
    elif recipe.name is RecipeName.dat and tokenizer is not None:
        total = 2 * total + classifier.input_gradient(attention_backward)
        total += 2 * vqgan_flops(tokenizer, cfg.model.img_size, train=False)
    return total


class FinetuneModule(nn.Module):
    """What DeepSpeed wraps: the classifier (`model.*`) and the frozen networks its recipe runs
    the images through: De³'s denoiser, DAT's VQGAN tokenizer."""

    def __init__(self, model: ViTClassifier, recipe, denoiser: Optional[MaskedAutoencoder] = None,
                 denoiser_norm_pix: bool = True, tokenizer: Optional[VQGAN] = None):
        super().__init__()
        self.model, self.recipe = model, recipe
        self.denoiser, self.denoiser_norm_pix, self.tokenizer = denoiser, denoiser_norm_pix, tokenizer
        for frozen in self.frozen():
            frozen.eval()  # no dropout/drop path, no gradients
            frozen.requires_grad_(False)

    def frozen(self) -> list[nn.Module]:
        return [m for m in (self.denoiser, self.tokenizer) if m is not None]

    def train(self, mode: bool = True) -> "FinetuneModule":
        super().train(mode)
        for frozen in self.frozen():
            frozen.eval()
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        return self.recipe(self, images, labels, generator)


def deployment_of(recipe: RecipeConfig) -> tuple[DefenseKind, float]:
    """What a recipe deploys: its defense and that defense's sigma in [0, 1] pixels."""
    if recipe.name is RecipeName.de3:
        return DefenseKind.denoise, recipe.de3.deploy_sigma / 255
    if recipe.name is RecipeName.dmae:
        return DefenseKind.smoothing, recipe.dmae.sigma
    return DefenseKind.none, 0.0


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
        self.denoiser_config: Optional[ModelConfig] = None
        self.denoiser_norm_pix = True
        if cfg.recipe.name is RecipeName.de3:
            self.denoiser_config, self.denoiser_norm_pix = read_autoencoder_export(cfg.recipe.de3.denoiser)
        self.tokenizer: Optional[VQGAN] = None
        if cfg.recipe.name is RecipeName.dat:  # loaded now: a bad file fails before any training work
            self.tokenizer = load_tokenizer(cfg.recipe.dat.tokenizer, cfg.recipe.dat.tokenizer_preset)
            check_input(self.tokenizer.cfg, cfg.data.image_size, cfg.data.channels, "recipe.dat.tokenizer")

    def build(self) -> FinetuneModule:
        cfg = self.cfg
        model = ViTClassifier(cfg.model)
        if cfg.init:
            log.info(f"finetune: initialized from {load_pretrained_encoder(model, cfg.init)}")
        model.set_grad_checkpointing(cfg.activation_checkpointing)
        denoiser = None
        if self.denoiser_config is not None:
            denoiser = MaskedAutoencoder(self.denoiser_config)
            load_weights(denoiser, cfg.recipe.de3.denoiser, strict=True)
        return FinetuneModule(model, build_recipe(cfg.recipe, cfg.model.num_classes), denoiser, self.denoiser_norm_pix,
                              self.tokenizer)

    def param_groups(self, module: FinetuneModule) -> list[dict]:
        optim = self.cfg.optim
        return layer_decay_groups(module.model, optim.weight_decay, optim.layer_decay, self.cfg.model.depth)

    def flops_per_image(self) -> float:
        return finetune_flops_per_image(self.cfg, self.denoiser_config, self.tokenizer.cfg if self.tokenizer else None)

    def deployed(self, module: FinetuneModule) -> DeployedModel:
        """The model as the eval stage will load it from the export."""
        defense, sigma = deployment_of(self.cfg.recipe)
        return deployed_model(defense, module.model, sigma, module.denoiser, module.denoiser_norm_pix)

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
    from pipeline.engine.trainer import train

    return train(cfg, FinetuneTask)

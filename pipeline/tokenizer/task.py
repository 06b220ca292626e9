"""Tokenizer training as an engine task: a VQGAN on the user's shards (labels unused), with the
same ZeRO stages, checkpoints, exact resume, signals and Slurm launch as every stage."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from robustmim.errors import UserError
from robustmim.pipeline.data.shardset import ShardSet, open_shards
from robustmim.pipeline.dist import DistEnv
from robustmim.pipeline.engine.optim import param_groups
from robustmim.pipeline.engine.validation import validation_batches
from robustmim.pipeline.flops import lpips_flops, vqgan_flops
from robustmim.pipeline.models.discriminator import PatchDiscriminator
from robustmim.pipeline.models.lpips import LPIPS, load_lpips
from robustmim.pipeline.models.vqgan import VQGAN, check_input, codebook_perplexity
from robustmim.pipeline.tokenizer.config import Reconstruction, TokenizerConfig, TokenizerLossConfig


class TokenizerModule(nn.Module):
    """What DeepSpeed wraps: the VQGAN (`model.*`, what export keeps), with the perceptual term
    on the frozen LPIPS network (`perceptual.*`, kept in checkpoints as taming does) and with the
    adversarial term on, the PatchGAN discriminator. VQGAN and discriminator train under one
    optimizer: the generator's GAN term runs the discriminator with detached parameters and the
    discriminator's term sees detached reconstructions, so each loss reaches only its own
    network's parameters."""

    def __init__(self, model: VQGAN, loss: TokenizerLossConfig, accumulation: int,
                 perceptual: Optional[LPIPS] = None):
        super().__init__()
        self.model, self.loss_cfg, self.perceptual = model, loss, perceptual
        if (perceptual is None) != (loss.perceptual_weight == 0):
            raise ValueError("TokenizerModule: give the LPIPS network exactly when loss.perceptual_weight > 0")
        self.discriminator = None
        if loss.adversarial_weight > 0:
            self.discriminator = PatchDiscriminator(model.cfg.in_channels, loss.discriminator_width,
                                                    loss.discriminator_layers)
            # Micro-batches seen, in the module state so a resumed run switches the GAN on at the same step.
            self.register_buffer("micro_steps", torch.zeros((), dtype=torch.long))
            self.adversarial_start = loss.adversarial_start_step * accumulation

    def forward(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        cfg = self.loss_cfg
        decoded, quantized = self.model(images)
        target = images * 2 - 1  # taming's [-1, 1]
        error = decoded - target
        reconstruction = error.abs().mean() if cfg.reconstruction is Reconstruction.l1 else error.pow(2).mean()
        metrics = {"reconstruction": reconstruction.detach(), "codebook": quantized.codebook_loss.detach(),
                   "commitment": quantized.commitment_loss.detach()}
        nll = reconstruction  # taming's name for the pixel (+ perceptual) term
        if self.perceptual is not None:
            perceptual = self.perceptual(target, decoded).mean()
            nll = nll + cfg.perceptual_weight * perceptual
            metrics["perceptual"] = perceptual.detach()
        loss = nll + cfg.codebook_weight * (quantized.codebook_loss + cfg.beta * quantized.commitment_loss)
        if self.discriminator is not None:
            active = (self.micro_steps >= self.adversarial_start).to(loss.dtype)  # a device flag: no host read
            self.micro_steps += 1
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            generator_term = -functional_call(self.discriminator, frozen, (decoded,)).mean()
            real, fake = self.discriminator(target), self.discriminator(decoded.detach())
            discriminator_term = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())  # hinge
            weight = cfg.adversarial_weight
            if cfg.adaptive_adversarial_weight:
                weight = weight * self.adaptive_factor(nll, generator_term)
                metrics["adversarial_factor"] = weight.detach()
            loss = loss + active * (weight * generator_term + discriminator_term)
            metrics.update(generator_gan=generator_term.detach(), discriminator=discriminator_term.detach())
        metrics["loss"] = loss.detach()
        return loss, metrics

    def adaptive_factor(self, nll: torch.Tensor, generator_term: torch.Tensor) -> torch.Tensor:
        """taming's adaptive GAN weight: the ratio of the two terms' gradient norms at the
        decoder's last layer, so neither dominates the decoder's update (a constant, detached)."""
        last_layer = self.model.decoder.conv_out.weight
        nll_grad, = torch.autograd.grad(nll, last_layer, retain_graph=True)
        gan_grad, = torch.autograd.grad(generator_term, last_layer, retain_graph=True)
        return (nll_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach()


class TokenizerTask:
    stage = "tokenizer"

    @classmethod
    def resolve(cls, cfg: TokenizerConfig, shards: ShardSet) -> TokenizerConfig:
        """The config unchanged, once the data's images are known to fit the tokenizer."""
        check_input(cfg.model, cfg.data.image_size, cfg.data.channels, f"{cfg.data.shards} (data.image_size, "
                                                                        f"data.channels)")
        if cfg.model.resolution != cfg.data.image_size:
            raise UserError(f"model.resolution={cfg.model.resolution} differs from data.image_size="
                            f"{cfg.data.image_size}: set both to the training image size")
        if cfg.validation.every_steps:  # fail now, not at the first validation
            open_shards(cfg.data.shards, cfg.validation.split)
        return cfg

    def __init__(self, cfg: TokenizerConfig, env: DistEnv, device: torch.device):
        self.cfg, self.env, self.device = cfg, env, device
        self.validate_every = cfg.validation.every_steps

    def build(self) -> TokenizerModule:
        cfg, world = self.cfg, self.env.world_size
        perceptual = load_lpips(cfg.loss.perceptual_weights) if cfg.loss.perceptual_weight > 0 else None
        return TokenizerModule(VQGAN(cfg.model), cfg.loss, cfg.accumulation(world), perceptual)

    def param_groups(self, module: TokenizerModule) -> list[dict]:
        groups = param_groups(module.model, self.cfg.optim.weight_decay)
        if module.discriminator is not None:
            groups += param_groups(module.discriminator, self.cfg.optim.weight_decay)
        return groups

    def flops_per_image(self) -> float:
        cfg = self.cfg
        flops = vqgan_flops(cfg.model, cfg.data.image_size, train=True)
        if cfg.loss.perceptual_weight > 0:
            flops += lpips_flops(cfg.data.channels, cfg.data.image_size)
        return flops

    def validate(self, module: TokenizerModule, step: int) -> dict[str, float]:
        """Mean squared reconstruction error in [0, 1] pixels and the codebook's perplexity
        over the validation split's tokens, each rank its exact chunk."""
        cfg, env, device = self.cfg, self.env, self.device
        n_embed = cfg.model.n_embed
        totals = torch.zeros(2, device=device, dtype=torch.float64)  # [squared error sum, images]
        histogram = torch.zeros(n_embed, device=device, dtype=torch.float64)
        for images, _ in validation_batches(cfg, cfg.validation, env):
            decoded, quantized = module.model(images)
            recon = (decoded.clamp(-1, 1) + 1) / 2  # as DAT's reconstruct() sees it
            totals[0] += (recon - images).pow(2).flatten(1).mean(1).sum()
            totals[1] += images.shape[0]
            histogram += torch.bincount(quantized.indices.flatten(), minlength=n_embed)
        dist.all_reduce(totals)
        dist.all_reduce(histogram)
        squared, seen = totals.tolist()
        return {"val_recon_mse": squared / max(seen, 1), "val_perplexity": codebook_perplexity(histogram).item(),
                "val_codes_used": float((histogram > 0).sum().item()), "val_samples": seen}


def train_tokenizer(cfg: TokenizerConfig) -> dict:
    from robustmim.pipeline.engine.trainer import train

    return train(cfg, TokenizerTask)

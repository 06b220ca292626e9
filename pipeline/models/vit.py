"""The masked autoencoder's ViT trunk, built from timm's blocks and patch embedding.

Parameter names follow timm's VisionTransformer (the classifier's class) and the official MAE
checkpoints (`patch_embed`, `cls_token`, `pos_embed`, `blocks`), so pretrained encoders move
from the autoencoder to the classifier by name. Pixel normalization lives inside the model (non-persistent buffers, not
in any checkpoint): every model takes [0, 1] images, where noise, attacks and clamps operate.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.utils.checkpoint

from robustmim.pipeline.models.config import EncoderConfig
from robustmim.pipeline.timm_import import timm  # noqa: F401  (makes timm importable with the CPU torch)
from timm.layers import PatchEmbed  # noqa: E402
from timm.models.vision_transformer import Block  # noqa: E402

layer_norm = partial(nn.LayerNorm, eps=1e-6)


def transformer_blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    """Pre-norm blocks with qkv bias, timm's `Block` (what its VisionTransformer stacks); no
    stochastic depth (MAE pretrains without it)."""
    return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=layer_norm) for _ in range(depth))


def compile_blocks(module: nn.Module) -> int:
    """torch.compile every transformer block of `module` in place; returns how many. Block by
    block: the code between blocks (masking, gathers, noise, losses) stays eager, so its shape
    changes cause no recompiles, and the blocks of one width share one compiled graph."""
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


class ViTTrunk(nn.Module):
    """Patch embedding, CLS token, position embedding and encoder blocks, plus the pixel
    normalization and optional activation checkpointing."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed sin-cos during pretraining (MAE); the classifier learns it from that start.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim), requires_grad=False)
        self.blocks = transformer_blocks(dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, -1, 1, 1), persistent=False)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward instead of keeping them (saves memory)."""
        self.grad_checkpointing = enabled

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """[B, L, D]: patch tokens with their position embeddings (no CLS yet)."""
        return self.patch_embed(images) + self.pos_embed[:, 1:, :]

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def normalize(self, images01: torch.Tensor) -> torch.Tensor:
        return (images01 - self.pixel_mean) / self.pixel_std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.pixel_std + self.pixel_mean

    def encoder_named_parameters(self):
        """(name, parameter) of the encoder alone: what fine-tuning keeps of a pretrained model."""
        for name, param in self.named_parameters():
            if not name.startswith(("decoder_", "mask_token")):
                yield name, param

"""A VQGAN (encoder, vector quantizer, decoder) in taming-transformers' parameter layout.

DAT discretizes images through a frozen VQGAN; its official code uses taming's
`vqgan_openimages_f8_16384`. Module and parameter names and shapes here follow taming's
`VQModel` (`encoder.down.{level}.block.{i}.norm1`, `quantize.embedding.weight`,
`quant_conv`, `post_quant_conv`, ...), so a published checkpoint loads strictly with
`load_taming_checkpoint`; the training-only `loss.*` tensors (LPIPS, discriminator) are
dropped. `robustmim tokenizer` trains the same network on the user's shards.

Images enter in [0, 1] (as everywhere in robustmim) and are mapped to taming's [-1, 1] inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustmim.errors import UserError
from robustmim.pipeline.models.config import NORM_GROUPS, VQGANConfig

def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the feature map's positions (1x1 conv projections)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (b, hw, c)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, height, width))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming pads right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level(blocks: list[nn.Module], attentions: list[nn.Module]) -> nn.Module:
    stage = nn.Module()
    stage.block, stage.attn = nn.ModuleList(blocks), nn.ModuleList(attentions)
    return stage


def middle(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1 = ResnetBlock(channels, channels, dropout), AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def run_middle(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def run_level(stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A level's residual blocks, each followed by its attention block where the level has them."""
    for i, block in enumerate(stage.block):
        h = block(h)
        if len(stage.attn):
            h = stage.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        size, channels = cfg.resolution, cfg.ch
        for index, mult in enumerate(cfg.ch_mult):
            blocks, attentions = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(channels, cfg.ch * mult, cfg.dropout))
                channels = cfg.ch * mult
                if size in cfg.attn_resolutions:
                    attentions.append(AttnBlock(channels))
            stage = level(blocks, attentions)
            if index != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(channels)
                size //= 2
            self.down.append(stage)
        self.mid = middle(channels, cfg.dropout)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, cfg.z_channels, 3, padding=1)  # double_z=False for VQGANs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = run_level(stage, h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return self.conv_out(F.silu(self.norm_out(run_middle(self.mid, h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        channels = cfg.ch * cfg.ch_mult[-1]
        size = cfg.resolution // cfg.downsampling
        self.conv_in = nn.Conv2d(cfg.z_channels, channels, 3, padding=1)
        self.mid = middle(channels, cfg.dropout)
        stages = []
        for index in reversed(range(len(cfg.ch_mult))):  # built coarse to fine, stored fine to coarse
            blocks, attentions = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(channels, cfg.ch * cfg.ch_mult[index], cfg.dropout))
                channels = cfg.ch * cfg.ch_mult[index]
                if size in cfg.attn_resolutions:
                    attentions.append(AttnBlock(channels))
            stage = level(blocks, attentions)
            if index != 0:
                stage.upsample = Upsample(channels)
                size *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = run_middle(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            h = run_level(stage, h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class Quantized:
    codes: torch.Tensor  # (b, embed_dim, h, w): the nearest codebook vectors, straight-through to z
    indices: torch.Tensor  # (b, h, w) codebook indices
    codebook_loss: torch.Tensor  # ||sg[z] - e||^2: moves the codes
    commitment_loss: torch.Tensor  # ||z - sg[e]||^2: keeps the encoder near its codes


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int, normalized: bool = False):
        super().__init__()
        self.normalized = normalized
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight
        return F.normalize(weight, dim=1) if self.normalized else weight

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Codebook indices (b, h, w) of the nearest code to each position of z (b, c, h, w)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codebook = self.codebook()
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)
        return distances.argmin(dim=1).view(z.shape[0], z.shape[2], z.shape[3])

    def forward(self, z: torch.Tensor) -> Quantized:
        if self.normalized:
            z = F.normalize(z, dim=1)
        indices = self.nearest(z)
        codes = F.embedding(indices, self.codebook()).permute(0, 3, 1, 2)
        # The VQ-VAE losses as written; taming's "legacy" quantizer puts beta on the codebook
        # term instead, a known swap that does not matter for a frozen model.
        return Quantized(codes=z + (codes - z).detach(), indices=indices,
                         codebook_loss=F.mse_loss(codes, z.detach()), commitment_loss=F.mse_loss(z, codes.detach()))


class VQGAN(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.normalized_codes)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, images01: torch.Tensor) -> Quantized:
        return self.quantize(self.quant_conv(self.encoder(images01 * 2 - 1)))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Decoder output in taming's [-1, 1] scale (unclamped; training losses use it as is)."""
        return self.decoder(self.post_quant_conv(codes))

    def forward(self, images01: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        quantized = self.encode(images01)
        return self.decode(quantized.codes), quantized

    def token_indices(self, images01: torch.Tensor) -> torch.Tensor:
        return self.encode(images01).indices


def reconstruct(vqgan: VQGAN, images01: torch.Tensor) -> torch.Tensor:
    """DAT's VQ(x): (clamp(Dec(Quant(Enc(2x - 1))), -1, 1) + 1) / 2, back in [0, 1]."""
    decoded, _ = vqgan(images01)
    return (decoded.clamp(-1, 1) + 1) / 2


def check_input(cfg: VQGANConfig, image_size: int, channels: int, source: str) -> None:
    if cfg.in_channels != channels:
        raise UserError(f"{source}: the tokenizer takes {cfg.in_channels}-channel images, the data has {channels}")
    if image_size % cfg.downsampling:
        raise UserError(f"{source}: image size {image_size} is not a multiple of the tokenizer's "
                        f"downsampling factor {cfg.downsampling}")


TRAINING_ONLY_PREFIX = "loss."  # taming checkpoints carry the LPIPS net and discriminator here


def load_taming_checkpoint(model: VQGAN, path: str | Path) -> int:
    """Strictly load a taming-transformers VQGAN (`.ckpt` with weights_only, or safetensors);
    returns how many training-only `loss.*` tensors were skipped."""
    from robustmim.pipeline.models.weights import match_state, read_state_dict

    state = read_state_dict(path)
    kept = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIX)}
    report, usable = match_state(model, kept, path)
    if report.missing or report.unexpected or report.mismatched:
        raise UserError(f"not a VQGAN of this architecture: {report}")
    model.load_state_dict(usable, strict=True)
    return len(state) - len(kept)


def codebook_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram: how many codes are in effective use."""
    probs = counts / counts.sum().clamp_min(1)
    return torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum())

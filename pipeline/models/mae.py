"""The masked autoencoder shared by MAE, NIM, DMAE and MIMIR.

Built from timm's `PatchEmbed` and `Block` (pre-norm, qkv bias, LayerNorm eps 1e-6; attention
through PyTorch's scaled-dot-product attention, so GPUs use flash kernels). Parameter names
follow the official MAE checkpoints: the encoder as timm's VisionTransformer names it
(`patch_embed`, `cls_token`, `pos_embed`, `blocks`, `norm`), then `decoder_embed`,
`mask_token`, `decoder_pos_embed`, `decoder_blocks`, `decoder_norm`, `decoder_pred`.

The model draws no random numbers: masking takes the caller's uniform noise (argsort: the
smallest values are kept), so the objectives control every draw with seeded generators.
Inputs are normalized images; the objectives add noise in [0, 1] space and call `normalize`.
Nothing here reads a tensor's value on the host.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from robustmim.pipeline.models.config import ModelConfig
from robustmim.pipeline.models.pos_embed import sincos_2d
from robustmim.pipeline.models.vit import ViTTrunk, layer_norm, transformer_blocks



def patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std (unbiased variance + 1e-6, as MAE's norm_pix_loss)."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    return mean, std

class MaskedOutput(NamedTuple):
    """A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 attaches its backward hooks (which
    re-gather a module's own parameters, e.g. mask_token) to tensors inside tuples and dicts."""

    pred: torch.Tensor  # [B, L, p*p*C]: per-patch prediction, in the target's (normalized) space
    mask: torch.Tensor  # [B, L]: 1 where the patch was hidden from the encoder, 0 where visible
    latent: torch.Tensor  # [B, 1 + kept, D]: encoder output after its final norm (CLS first)


def random_masking(x: torch.Tensor, noise: torch.Tensor, mask_ratio: float):
    """Keep int(L * (1 - ratio)) tokens per sample, those with the smallest noise.

    Returns (kept tokens [B, keep, D], mask [B, L], ids_restore [B, L]) where ids_restore
    inverts the shuffle: gathering the shuffled sequence with it gives the original order.
    """
    batch, length, dim = x.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    # float32 whatever the autocast dtype: its sums count patches, exact in float32 (not bf16)
    mask = torch.ones(batch, length, device=x.device, dtype=torch.float32)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


class MaskedAutoencoder(ViTTrunk):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.cfg = cfg
        dec_dim, dec_depth, dec_heads = cfg.decoder_dims
        num_patches = self.patch_embed.num_patches
        self.norm = layer_norm(cfg.embed_dim)

        self.decoder_embed = nn.Linear(cfg.embed_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dec_dim), requires_grad=False)
        self.decoder_blocks = transformer_blocks(dec_dim, dec_depth, dec_heads, cfg.mlp_ratio)
        self.decoder_norm = layer_norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, cfg.patch_size ** 2 * cfg.in_chans)
        self.reset_parameters()

    # -- initialization (MAE's) ------------------------------------------------------------------
    def reset_parameters(self) -> None:
        grid = int(self.patch_embed.num_patches ** 0.5)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], grid).unsqueeze(0))
            self.decoder_pos_embed.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], grid).unsqueeze(0))
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- pixels and patches ----------------------------------------------------------------------
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C] in MAE's order (row-major patches, (p, q, c) inside)."""
        p, c = self.cfg.patch_size, images.shape[1]
        h = w = images.shape[2] // p
        x = images.reshape(images.shape[0], c, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(images.shape[0], h * w, p * p * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        p, c = self.cfg.patch_size, self.cfg.in_chans
        h = w = int(patches.shape[1] ** 0.5)
        x = patches.reshape(patches.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(patches.shape[0], c, h * p, w * p)

    def reconstruct_image(self, pred: torch.Tensor, reference01: torch.Tensor, norm_pix: bool,
                          noise_sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        """The prediction as a [0, 1]-space image: per-patch statistics restored from `reference01`,
        patches reassembled, normalization undone. Not clamped.

        NIM's code restores the clean target's statistics, also when it evaluates De³ (the clean
        image leaks into the defense's output). A deployed denoiser only has its noisy input, so
        pass `noise_sigma` (per image, [0, 1] units) with a noisy reference: the known noise
        variance is subtracted from each patch's variance; the patch mean is unbiased as it is.
        """
        if norm_pix:
            mean, std = patch_stats(self.patchify(self.normalize(reference01)))
            if noise_sigma is not None:
                sigma = torch.as_tensor(noise_sigma, device=pred.device, dtype=torch.float32).reshape(-1, 1, 1)
                # noise variance per normalized pixel, averaged over channels (equal counts per patch)
                noise_var = sigma**2 * (1 / self.pixel_std.float() ** 2).mean()
                std = ((std**2 - noise_var).clamp_min(0) + 1e-6).sqrt()
            pred = pred * std + mean
        return self.denormalize(self.unpatchify(pred))

    # -- forward ---------------------------------------------------------------------------------
    def forward_encoder(self, images: torch.Tensor, mask_noise: Optional[torch.Tensor], mask_ratio: float):
        x = self.embed_patches(images)
        if mask_noise is None or mask_ratio == 0:  # NIM: every patch, no masking
            mask = torch.zeros(x.shape[:2], device=x.device, dtype=torch.float32)
            ids_restore = None
        else:
            x, mask, ids_restore = random_masking(x, mask_noise, mask_ratio)
        return self.norm(self._run_blocks(self.blocks, self.prepend_cls(x))), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.decoder_embed(latent)
        if ids_restore is not None:
            length = ids_restore.shape[1]
            fill = self.mask_token.expand(x.shape[0], length + 1 - x.shape[1], -1)
            tokens = torch.cat([x[:, 1:, :], fill], dim=1)
            tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
            x = torch.cat([x[:, :1, :], tokens], dim=1)
        x = self._run_blocks(self.decoder_blocks, x + self.decoder_pos_embed)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]  # the CLS slot is dropped

    def forward(self, images: torch.Tensor, mask_noise: Optional[torch.Tensor] = None,
                mask_ratio: float = 0.0) -> MaskedOutput:
        """images: normalized [B, C, H, W]; mask_noise: uniform [B, L] (None: no masking)."""
        latent, mask, ids_restore = self.forward_encoder(images, mask_noise, mask_ratio)
        return MaskedOutput(self.forward_decoder(latent, ids_restore), mask, latent)

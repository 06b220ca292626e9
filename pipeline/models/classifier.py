"""The fine-tuned classifier (MAE's models_vit): the ViT encoder, global average pooling of
the patch tokens, `fc_norm`, and a linear head. It takes [0, 1] images and normalizes them
inside, as randomized smoothing and pixel-space attacks require.

Keys follow MAE's fine-tuning models, so an official MAE / DMAE / MIMIR pretraining checkpoint
or our export loads by name: the encoder keys match; `head.*` and `fc_norm.*` are new (with
global pooling the pretrained `norm.*` is unused, as in MAE); decoder keys are left out.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustmim.errors import UserError
from pipeline.models.config import ClassifierConfig
from pipeline.models.pos_embed import sincos_2d
from pipeline.models.vit import ViTTrunk, layer_norm
from pipeline.models.weights import LoadReport, match_state, read_state_dict

DECODER_PREFIXES = ("decoder_", "mask_token")


class ViTClassifier(ViTTrunk):
    def __init__(self, cfg: ClassifierConfig):
        if cfg.num_classes <= 0:
            raise ValueError("ClassifierConfig.num_classes must be resolved (> 0) before building the model")
        super().__init__(cfg, drop_path=cfg.drop_path, learnable_pos_embed=True)
        self.cfg = cfg
        if cfg.global_pool:
            self.fc_norm = layer_norm(cfg.embed_dim)
        else:
            self.norm = layer_norm(cfg.embed_dim)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """From scratch: timm's ViT init with sin-cos positions; the head as MAE's fine-tuning
        (trunc normal, std 2e-5), so pretrained features are not swamped at the start."""
        with torch.no_grad():
            grid = int(self.patch_embed.num_patches ** 0.5)
            self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], grid).unsqueeze(0))
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)

    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """[B, D]: the pooled, normalized representation the head classifies."""
        x = self.prepend_cls(self.embed_patches(self.normalize(images01)))
        x = self._run_blocks(self.blocks, x)
        if self.cfg.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """[0, 1] images [B, C, H, W] -> logits [B, num_classes]."""
        return self.head(self.features(images01))


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + g*g, D] -> [1, 1 + grid*grid, D]: bicubic on the patch grid, CLS slot kept (MAE's
    interpolate_pos_embed, for fine-tuning at another resolution)."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(patches.shape[1] ** 0.5)
    if old * old != patches.shape[1]:
        raise UserError(f"pos_embed with {patches.shape[1]} patch positions is not a square grid")
    image = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)], dim=1)


def load_pretrained_encoder(model: ViTClassifier, path: str) -> LoadReport:
    """Initialize the classifier's encoder from a pretraining checkpoint (ours or official).

    Decoder tensors are dropped; the position embedding is resized when the grid differs. The
    report's `missing` lists what stays freshly initialized; a missing encoder key is an error.
    """
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(DECODER_PREFIXES)}
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], int(model.patch_embed.num_patches ** 0.5))
    report, usable = match_state(model, state, path)
    fresh = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias", "norm.weight", "norm.bias"}
    if set(report.missing) - fresh or report.mismatched:
        raise UserError(f"cannot initialize the classifier's encoder: {report}")
    model.load_state_dict(usable, strict=False)
    return report

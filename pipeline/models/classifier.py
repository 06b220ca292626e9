"""The fine-tuned classifier: timm's `VisionTransformer` with global average pooling of the patch
tokens, `fc_norm` and drop path (the class MAE's own fine-tuning model, models_vit, builds on),
in a thin subclass that takes [0, 1] images and normalizes them inside, as randomized smoothing
and pixel-space attacks require.

Keys are timm's and MAE's fine-tuning model's, so an official MAE / DMAE / MIMIR pretraining
checkpoint or our export loads by name: the encoder keys match; `head.*` and `fc_norm.*` are new
(with global pooling the pretrained `norm.*` is unused, as in MAE); decoder keys are left out.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from robustmim.errors import UserError
from robustmim.pipeline.models.config import ClassifierConfig
from robustmim.pipeline.models.pos_embed import sincos_2d
from robustmim.pipeline.models.vit import layer_norm
from robustmim.pipeline.models.weights import LoadReport, match_state, read_state_dict
from robustmim.pipeline.timm_import import timm  # noqa: F401  (makes timm importable with the CPU torch)
from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.layers import DropPath  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

DECODER_PREFIXES = ("decoder_", "mask_token")


def drop_path_rates(drop_path: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 at the first block to `drop_path` at the last."""
    return [drop_path * i / (depth - 1) for i in range(depth)] if depth > 1 else [drop_path]


class ViTClassifier(VisionTransformer):
    def __init__(self, cfg: ClassifierConfig):
        if cfg.num_classes <= 0:
            raise ValueError("ClassifierConfig.num_classes must be resolved (> 0) before building the model")
        # weight_init="skip": timm's constructor draws nothing beyond the layers' default inits;
        # reset_parameters below is the one place that initializes.
        super().__init__(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                         num_classes=cfg.num_classes, global_pool="avg" if cfg.global_pool else "token",
                         embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                         mlp_ratio=cfg.mlp_ratio, qkv_bias=True, drop_path_rate=cfg.drop_path,
                         norm_layer=layer_norm, weight_init="skip")
        # timm spaces the stochastic-depth rates with a float32 linspace; ours are exact float64
        # values. They differ in the eighth digit only, and keeping ours keeps every fine-tuning
        # run made before the classifier became timm's reproducible bit for bit.
        for block, rate in zip(self.blocks, drop_path_rates(cfg.drop_path, cfg.depth)):
            block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
            block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()
        self.cfg = cfg
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, -1, 1, 1), persistent=False)
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

    def normalize(self, images01: torch.Tensor) -> torch.Tensor:
        return (images01 - self.pixel_mean) / self.pixel_std

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """[0, 1] images [B, C, H, W] -> logits [B, num_classes]."""
        return super().forward(self.normalize(images01))


def load_pretrained_encoder(model: ViTClassifier, path: str) -> LoadReport:
    """Initialize the classifier's encoder from a pretraining checkpoint (ours or official).

    Decoder tensors are dropped; the position embedding is resized bicubically on the patch grid
    when the grid differs, CLS slot kept (MAE's interpolate_pos_embed: no antialiasing). The
    report's `missing` lists what stays freshly initialized; a missing encoder key is an error.
    """
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(DECODER_PREFIXES)}
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        old_patches = state["pos_embed"].shape[1] - 1
        if int(old_patches ** 0.5) ** 2 != old_patches:
            raise UserError(f"{path}: pos_embed with {old_patches} patch positions is not a square grid")
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=1, antialias=False)
    report, usable = match_state(model, state, path)
    fresh = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias", "norm.weight", "norm.bias"}
    if set(report.missing) - fresh or report.mismatched:
        raise UserError(f"cannot initialize the classifier's encoder: {report}")
    model.load_state_dict(usable, strict=False)
    return report

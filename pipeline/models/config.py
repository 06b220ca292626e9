"""Model configuration: named encoder and decoder sizes (MAE's, MIMIR's, and tiny CPU ones)."""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (patch size, width, depth, heads)
ENCODERS = {
    "vit_tiny_patch4": (4, 192, 4, 3),  # CPU tests and demos at 28-32 px
    "vit_tiny6_patch4": (4, 192, 6, 3),
    "vit_tiny_patch7": (7, 192, 4, 3),  # the 28-px demo: 16 tokens, a third of patch4's cost
    "vit_small_patch16": (16, 384, 12, 6),  # MIMIR's ViT-S
    "vit_base_patch16": (16, 768, 12, 12),
    "vit_large_patch16": (16, 1024, 24, 16),
    "vit_huge_patch14": (14, 1280, 32, 16),
}
# name -> (width, depth, heads)
DECODERS = {
    "mae": (512, 8, 16),  # MAE, NIM and DMAE
    "mimir": (128, 2, 16),  # MIMIR's small decoder
    "tiny": (128, 2, 4),
}


@dataclass
class EncoderConfig:
    """The ViT encoder shared by the autoencoder (pretraining) and the classifier (fine-tuning)."""

    encoder: str = "vit_large_patch16"  # one of ENCODERS above (vit_large_patch16, vit_tiny_patch7, ...)
    img_size: int = 224  # input side in pixels; must equal data.image_size
    in_chans: int = 3  # input channels; must equal data.channels
    mlp_ratio: float = 4.0  # MLP width over embedding width in each block
    # Normalization applied inside the models, after noise is added in [0, 1] pixel space.
    pixel_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    pixel_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))  # one per channel, as pixel_mean

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder '{self.encoder}' unknown; known: {sorted(ENCODERS)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch size {self.patch_size}")
        if not len(self.pixel_mean) == len(self.pixel_std) == self.in_chans:
            raise ValueError(f"pixel_mean and pixel_std need {self.in_chans} values (in_chans)")

    @property
    def patch_size(self) -> int:
        return ENCODERS[self.encoder][0]

    @property
    def embed_dim(self) -> int:
        return ENCODERS[self.encoder][1]

    @property
    def depth(self) -> int:
        return ENCODERS[self.encoder][2]

    @property
    def num_heads(self) -> int:
        return ENCODERS[self.encoder][3]

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


@dataclass
class ModelConfig(EncoderConfig):
    """The masked autoencoder: an encoder and a named decoder."""

    decoder: str = "mae"  # one of DECODERS above: mae (8 blocks, 512 wide), mimir (2, 128), tiny

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder '{self.decoder}' unknown; known: {sorted(DECODERS)}")

    @property
    def decoder_dims(self) -> tuple[int, int, int]:
        return DECODERS[self.decoder]


@dataclass
class ClassifierConfig(EncoderConfig):
    """The fine-tuned classifier (MAE's models_vit): encoder, global average pool, fc_norm, head."""

    num_classes: int = 0  # 0: the number of classes in the training shards' manifest
    global_pool: bool = True  # average the patch tokens (MAE's default); False: the CLS token
    drop_path: float = 0.1  # stochastic depth, rising linearly to this rate at the last block

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: from the manifest), got {self.num_classes}")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")


NORM_GROUPS = 32  # taming's Normalize(): GroupNorm(32, C, eps=1e-6); channel counts must divide by it


@dataclass
class VQGANConfig:
    """taming's `ddconfig` plus the codebook. Defaults: the f16 ImageNet model with 1024 codes."""

    in_channels: int = 3  # image channels
    resolution: int = 256  # image side the encoder is built for
    ch: int = 128  # base channel count, multiplied by ch_mult per level
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # one entry per resolution level
    num_res_blocks: int = 2  # residual blocks per resolution level
    attn_resolutions: list[int] = field(default_factory=lambda: [16])  # feature-map sizes with self-attention
    z_channels: int = 256  # channels of the encoder's output before the codebook projection
    embed_dim: int = 256  # dimension of each code
    n_embed: int = 1024  # codebook size
    dropout: float = 0.0  # inside the residual blocks
    # Look codes up by cosine similarity (l2-normalized z and codebook, Yu et al.'s ViT-VQGAN):
    # no parameter changes, far better code usage for small tokenizers; taming's models use False.
    normalized_codes: bool = False

    def __post_init__(self) -> None:
        if not self.ch_mult or min(self.ch_mult) < 1 or self.ch < 1 or self.num_res_blocks < 1:
            raise ValueError("tokenizer model: ch, num_res_blocks and every ch_mult entry must be >= 1")
        bad = sorted({self.ch * m for m in self.ch_mult if (self.ch * m) % NORM_GROUPS})
        if bad:
            raise ValueError(f"tokenizer model: channel counts {bad} (ch x ch_mult) must be multiples of "
                             f"{NORM_GROUPS} (taming's GroupNorm)")
        if self.z_channels < 1 or self.embed_dim < 1 or self.n_embed < 2:
            raise ValueError("tokenizer model: z_channels, embed_dim >= 1 and n_embed >= 2 required")

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


# The published taming-transformers / latent-diffusion VQGANs (ddconfig values from their configs).
PRESETS = {
    "f16_1024": VQGANConfig(),
    "f16_16384": VQGANConfig(n_embed=16384),
    "f8_16384": VQGANConfig(ch_mult=[1, 2, 2, 4], attn_resolutions=[32], z_channels=4, embed_dim=4, n_embed=16384),
}

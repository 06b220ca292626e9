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

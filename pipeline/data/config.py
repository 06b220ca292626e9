"""Configuration of the data loaders."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from omegaconf import MISSING


class LoaderDevice(enum.Enum):
    auto = "auto"  # gpu when torch sees CUDA, else cpu
    cpu = "cpu"  # CPU decode and operators, CPU tensors (machines without a GPU, CI)
    gpu = "gpu"  # `mixed` JPEG decode, GPU operators, CUDA tensors


@dataclass
class LoaderConfig:
    shards: str = MISSING  # a directory written by `robustmim shards build`
    split: str = "train"  # the split read (train, val, test: whatever the shards hold)
    batch_size: int = 64  # per rank
    image_size: int = 224  # side of the square output
    channels: int = 3  # 3: RGB (grayscale images expanded); 1: grayscale
    # Training augmentation as in MAE: RandomResizedCrop (bicubic) and horizontal flip.
    # augment=False gives the evaluation transform (resize + center crop, no randomness).
    augment: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop's area range
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # RandomResizedCrop's aspect-ratio range
    flip: bool = True  # random horizontal flip (augment=true only)
    # Evaluation: resize the shorter side to image_size / eval_crop_fraction, then center crop.
    eval_crop_fraction: float = 0.875
    seed: int = 0  # shuffling and augmentation draws
    # Samples DALI holds to shuffle within (the shards are globally shuffled when built, and
    # the order of whole shards is reshuffled every epoch).
    shuffle_buffer: int = 4096
    num_threads: int = 4  # DALI CPU threads per rank
    prefetch: int = 2  # batches DALI prepares ahead
    device: LoaderDevice = LoaderDevice.auto  # auto (gpu when CUDA is seen), cpu or gpu
    # GPU (`mixed`) JPEG decoding only: the share of images for the hardware JPEG decoder of
    # A100/H100-class GPUs (the rest go to CUDA nvJPEG), and memory reserved up front so the
    # decoder does not reallocate as image sizes vary (the usual cure for nvJPEG allocation
    # failures and growing memory). 0 leaves a padding or hint to DALI's default.
    hw_decoder_load: float = 0.65
    device_memory_padding: int = 64 << 20  # bytes per decoder thread on the GPU
    host_memory_padding: int = 16 << 20  # bytes of pinned host memory per thread
    preallocate_width_hint: int = 0  # typical largest image width (ImageNet: ~4,000 px)
    preallocate_height_hint: int = 0  # typical largest image height
    # sha256 every shard at start-up: the one defence against same-size damage inside a shard
    # (reads the whole split once, ~1 s per GB per core; sizes and index hashes are always checked).
    verify_hashes: bool = False

    # Settings that change how fast samples come, not which: a resumed run may change them (and the
    # shard directory's path, e.g. moved to faster storage) without being another run.
    performance_only: ClassVar[tuple[str, ...]] = (
        "shards", "batch_size", "num_threads", "prefetch", "device", "hw_decoder_load", "device_memory_padding",
        "host_memory_padding", "preallocate_width_hint", "preallocate_height_hint", "verify_hashes")

    def __post_init__(self) -> None:
        if not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        if min(self.device_memory_padding, self.host_memory_padding, self.preallocate_width_hint,
               self.preallocate_height_hint) < 0:
            raise ValueError("the decoder's memory paddings and preallocation hints must be >= 0")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(self.crop_scale)}")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must be [low, high] with 0 < low <= high, got {list(self.crop_ratio)}")
        if not 0 < self.eval_crop_fraction <= 1:
            raise ValueError(f"eval_crop_fraction must be in (0, 1], got {self.eval_crop_fraction}")
        if self.shuffle_buffer <= 0 or self.num_threads <= 0 or self.prefetch <= 0:
            raise ValueError("shuffle_buffer, num_threads and prefetch must be positive")

    @property
    def eval_resize(self) -> int:
        return round(self.image_size / self.eval_crop_fraction)

"""Configuration of `robustmim shards build`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from omegaconf import MISSING

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class SourceKind(enum.Enum):
    fashion_mnist = "fashion_mnist"  # Debian's dataset-fashion-mnist gzip idx files
    imagenet = "imagenet"  # train/<class>/*, val/<class>/* or a flat val/ with label files


SPLITS = {SourceKind.fashion_mnist: ("train", "val"), SourceKind.imagenet: ("train", "val")}


@dataclass
class ShardsConfig:
    renamed_keys: ClassVar[dict[str, str]] = {"out": "out_dir"}  # one output-directory name across stages

    source: SourceKind = SourceKind.fashion_mnist  # fashion_mnist (Debian's dataset-fashion-mnist) or imagenet
    # Dataset root: Fashion-MNIST's directory, or the ImageNet root holding train/ and val/.
    input: str = FASHION_MNIST_DIR
    out_dir: str = MISSING  # the shards directory to write (manifest.json, <split>-*.tar)
    # Fashion-MNIST's 10k test images are written as split "val", the split later stages evaluate.
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    # Fixes the global shuffle of samples across shards; same input + seed -> identical shards.
    seed: int = 0
    # A shard closes before it would pass either limit (0 disables the sample limit).
    shard_max_bytes: int = 1_000_000_000
    shard_max_samples: int = 0  # the sample limit
    # Writer processes; 0 uses every core.
    workers: int = 0
    # Flat val/: LOC_val_solution.csv, or ILSVRC2012_validation_ground_truth.txt together with
    # val_synsets (the devkit's meta.mat, or a text file of wnids in ILSVRC2012_ID order).
    # Empty: looked up by their usual names in `input` and `input`/val.
    val_labels: str = ""
    val_synsets: str = ""  # with ILSVRC2012_validation_ground_truth.txt: the devkit's meta.mat or a wnid list

    def __post_init__(self) -> None:
        known = SPLITS[self.source]
        if not self.splits:
            raise ValueError("splits: at least one split is needed")
        unknown = [s for s in self.splits if s not in known]
        if unknown:
            raise ValueError(f"splits: unknown split(s) {unknown} for source {self.source.value}; known: {list(known)}")
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits: repeated split in {list(self.splits)}")
        if self.shard_max_bytes <= 0:
            raise ValueError(f"shard_max_bytes must be positive, got {self.shard_max_bytes}")
        if self.shard_max_samples < 0:
            raise ValueError(f"shard_max_samples must be >= 0 (0 = no limit), got {self.shard_max_samples}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = every core), got {self.workers}")

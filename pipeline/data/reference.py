"""A reference loader built only on webdataset, PIL and a torch DataLoader.

It reads the same shards with the same transforms as the DALI loader, written the plain way:
the tests use it as the oracle for what DALI must produce with augmentation off (equal up to
decoder and resampling rounding), and the loader bench uses it as the baseline. It is not a
runtime fallback: it has no exact resume, and it splits ranks by whole shards. webdataset is a
development dependency (`pip install -e .[dev]`) for this reason.
"""

from __future__ import annotations

import math
import random
from typing import Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from robustmim.pipeline.data.config import LoaderConfig
from robustmim.pipeline.data.dali import Batch
from robustmim.pipeline.data.shardset import open_shards


def to_tensor(image: Image.Image) -> torch.Tensor:
    """float32 CHW in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).float().div_(255.0)


def resize_shorter(image: Image.Image, shorter: int) -> Image.Image:
    w, h = image.size
    size = (shorter, round(h * shorter / w)) if w <= h else (round(w * shorter / h), shorter)
    return image if size == (w, h) else image.resize(size, Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    left, top = round((w - size) / 2), round((h - size) / 2)
    return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(width: int, height: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, w, h): an area fraction in `scale` and a log-uniform aspect ratio in `ratio`;
    after 10 failed draws, the largest centered crop within the ratio bounds."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class Transform:
    """The DALI loader's transforms on PIL images; each DataLoader worker draws from its own RNG."""

    def __init__(self, cfg: LoaderConfig, train: bool, seed: int):
        self.cfg, self.train, self.seed = cfg, train, seed
        self._rng: Optional[random.Random] = None

    def __call__(self, sample) -> tuple[torch.Tensor, int]:
        image, label = sample
        image = image.convert("RGB" if self.cfg.channels == 3 else "L")
        size = self.cfg.image_size
        if self.train and self.cfg.augment:
            if self._rng is None:
                info = torch.utils.data.get_worker_info()
                self._rng = random.Random(f"{self.seed}:{info.id if info else 0}")
            left, top, w, h = random_resized_crop_box(*image.size, self.cfg.crop_scale, self.cfg.crop_ratio, self._rng)
            image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
            if self.cfg.flip and self._rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            image = center_crop(resize_shorter(image, self.cfg.eval_resize), size)
        return to_tensor(image), int(label)


class ReferenceLoader:
    """Batches from webdataset + PIL: a shuffled, repeating stream (train) or one ordered pass."""

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world_size: int = 1, train: bool = True,
                 num_workers: int = 2):
        shards = open_shards(cfg.shards, cfg.split)
        urls = shards.tar_paths
        dataset = wds.WebDataset(urls, shardshuffle=len(urls) if train else False, seed=cfg.seed,
                                 nodesplitter=lambda u: list(u)[rank::world_size], workersplitter=wds.split_by_worker,
                                 empty_check=False)
        if train:
            dataset = dataset.shuffle(cfg.shuffle_buffer, rng=random.Random(f"{cfg.seed}:{rank}")).repeat()
        dataset = dataset.decode("pil").to_tuple("jpg;png", "cls").map(Transform(cfg, train, cfg.seed * 1000 + rank))
        self._loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=num_workers,
                                                   persistent_workers=num_workers > 0)
        self._iterator = iter(self._loader)

    def __iter__(self) -> "ReferenceLoader":
        return self

    def __next__(self) -> Batch:
        images, labels = next(self._iterator)
        return Batch(images, labels.long())

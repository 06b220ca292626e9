"""A synthetic ImageNet-style tree of real JPEGs, for tests, benches and rehearsing a build.

Images are random crops of scikit-image's bundled sample photos (nothing is downloaded),
resized to random sizes and saved as JPEG. The layout matches ImageNet's:
`train/<wnid>/<wnid>_<n>.JPEG`, and `val/` either in class folders or flat
(`ILSVRC2012_val_<n>.JPEG`) with a `LOC_val_solution.csv` in the root.
scikit-image is a development dependency (`pip install robustmim[dev]`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel")


def _photos() -> list[np.ndarray]:
    import skimage.data

    return [getattr(skimage.data, name)() for name in PHOTOS]


@dataclass
class SyntheticTree:
    root: Path
    wnids: list[str]
    train: dict[str, str]  # relative path -> wnid
    val: dict[str, str]


def make_image_tree(root: str | Path, classes: int = 3, train_per_class: int = 8, val_per_class: int = 4,
                    min_size: int = 224, max_size: int = 500, flat_val: bool = False, seed: int = 0,
                    quality: int = 90) -> SyntheticTree:
    root = Path(root)
    rng = np.random.default_rng(seed)
    photos = _photos()
    wnids = [f"n{10000000 + 1111 * i:08d}" for i in range(classes)]

    def random_jpeg(path: Path) -> None:
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        ch, cw = rng.integers(h // 4, h + 1), rng.integers(w // 4, w + 1)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        size = tuple(int(s) for s in rng.integers(min_size, max_size + 1, size=2))
        image = Image.fromarray(photo[y:y + ch, x:x + cw]).resize(size, Image.BICUBIC)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="JPEG", quality=quality)

    train, val = {}, {}
    for wnid in wnids:
        for n in range(train_per_class):
            rel = f"train/{wnid}/{wnid}_{n}.JPEG"
            random_jpeg(root / rel)
            train[rel] = wnid
    val_labels = [wnid for wnid in wnids for _ in range(val_per_class)]
    rng.shuffle(val_labels)
    for n, wnid in enumerate(val_labels, start=1):
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        rel = f"val/{name}" if flat_val else f"val/{wnid}/{name}"
        random_jpeg(root / rel)
        val[rel] = wnid
    if flat_val:
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ImageId", "PredictionString"])
            for rel, wnid in val.items():
                writer.writerow([Path(rel).stem, f"{wnid} 0 0 10 10"])
    return SyntheticTree(root, wnids, train, val)

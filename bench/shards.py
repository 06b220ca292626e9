"""Images/s of `robustmim shards build`, with 1 and 2 writer processes.

    .venv/bin/python -m bench.shards [--imagenet-like N] [--out DIR]

Sources: the embedded Fashion-MNIST (70,000 28x28 images, PNG-encoded), and a synthetic
ImageNet-like tree of N JPEGs of 224-500 px made from scikit-image's sample photos (decoded
once to check them, stored as they are). Each row is one full build into a fresh directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from robustmim.config import load_config
from robustmim.shards.build import build_shards
from robustmim.shards.config import FASHION_MNIST_DIR, ShardsConfig
from robustmim.shards.synthetic import make_image_tree


def timed_build(overrides: list[str]) -> tuple[int, float, float]:
    cfg = load_config(ShardsConfig, None, overrides)
    start = time.perf_counter()
    manifest = build_shards(cfg)
    seconds = time.perf_counter() - start
    images = sum(s.total for s in manifest.splits.values())
    gb = sum(e.bytes for s in manifest.splits.values() for e in s.shards) / 1e9
    return images, seconds, gb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imagenet-like", type=int, default=2000, help="images in the synthetic tree")
    parser.add_argument("--out", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    scratch = Path(args.out or tempfile.mkdtemp(prefix="bench-shards-"))
    classes = 10
    tree = make_image_tree(scratch / "tree", classes=classes, train_per_class=args.imagenet_like // classes,
                           val_per_class=0, min_size=224, max_size=500, seed=0)
    tree_mb = sum(p.stat().st_size for p in (scratch / "tree").rglob("*.JPEG")) / 1e6

    rows = []
    for name, base in (("fashion-mnist 28px PNG", ["source=fashion_mnist", f"input={FASHION_MNIST_DIR}",
                                                   "shard_max_samples=5000"]),
                       (f"imagenet-like 224-500px JPEG ({tree_mb:.0f} MB)",
                        ["source=imagenet", f"input={tree.root}", "splits=[train]", "shard_max_samples=200"])):
        for workers in (1, 2):
            out = scratch / f"out-{len(rows)}"
            images, seconds, gb = timed_build([*base, f"out_dir={out}", f"workers={workers}"])
            rows.append((name, workers, images, seconds, images / seconds, gb * 1e3 / seconds))
            shutil.rmtree(out)

    print(f"\nshards build on {os.cpu_count()} cores")
    print(f"{'source':<44} {'workers':>7} {'images':>7} {'seconds':>8} {'images/s':>9} {'MB/s':>7}")
    for name, workers, images, seconds, rate, mbs in rows:
        print(f"{name:<44} {workers:>7} {images:>7} {seconds:>8.1f} {rate:>9.0f} {mbs:>7.1f}")
    if not args.out:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()

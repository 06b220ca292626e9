"""Images/s of the DALI loader against the webdataset+PIL reference loader, same shards.

    .venv/bin/python -m bench.loader [--batch 128] [--batches 200] [--device auto|cpu|gpu] [--fashion-mnist]

Sources: a synthetic ImageNet-like set of 224-500 px JPEGs (made here, nothing needed) and,
with --fashion-mnist, Fashion-MNIST (28 px PNG, where Debian's package is installed). Each row:
training transform (RandomResizedCrop + flip, bicubic) to the output size, --batches timed
batches after two warm-up ones (the stream cycles over the set); DALI with --threads CPU
threads (GPU: `mixed` decode with the LoaderConfig's hw_decoder_load and memory reservations,
GPU operators), the reference with --threads DataLoader workers. On a GPU: --device gpu
--batch 256 --threads 16.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from robustmim.config import load_config
from robustmim.pipeline.data.config import LoaderConfig
from robustmim.pipeline.data.dali import DaliLoader
from robustmim.pipeline.data.reference import ReferenceLoader
from robustmim.shards.build import build_shards
from robustmim.shards.config import FASHION_MNIST_DIR, ShardsConfig
from robustmim.shards.synthetic import make_image_tree


def images_per_second(loader, batches: int) -> float:
    for _ in range(2):
        next(loader)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        batch = next(loader)
        n += batch.labels.shape[0]
    if batch.images.is_cuda:
        import torch

        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def build(overrides: list[str]) -> None:
    build_shards(load_config(ShardsConfig, None, overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--jpegs", type=int, default=3000, help="images in the synthetic JPEG set")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--fashion-mnist", action="store_true", help="also the 28 px Fashion-MNIST case")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:  # shards built here go with it
        scratch = Path(tmp)
        make_image_tree(scratch / "tree", classes=10, train_per_class=args.jpegs // 10, val_per_class=0,
                        min_size=224, max_size=500, seed=0)
        build(["source=imagenet", f"input={scratch / 'tree'}", f"out_dir={scratch / 'jpeg'}", "splits=[train]",
               "shard_max_samples=250"])

        cases = [("JPEG 224-500px -> 224", scratch / "jpeg", 224, 3)]
        if args.fashion_mnist:
            build([f"input={FASHION_MNIST_DIR}", f"out_dir={scratch / 'fmnist'}", "splits=[train]",
                   "shard_max_samples=5000"])
            cases.append(("fashion-mnist 28px PNG -> 28", scratch / "fmnist", 28, 1))
        rows = []
        for name, shards, size, channels in cases:
            cfg = load_config(LoaderConfig, None, [
                f"shards={shards}", "split=train", f"batch_size={args.batch}", f"image_size={size}",
                f"channels={channels}", f"num_threads={args.threads}", f"device={args.device}", "shuffle_buffer=1024"])
            dali = DaliLoader(cfg)
            rows.append((name, f"DALI ({'gpu' if dali.on_gpu else 'cpu'})", images_per_second(dali, args.batches)))
            del dali
            if not args.skip_reference:
                reference = ReferenceLoader(cfg, num_workers=args.threads)
                rows.append((name, "webdataset+PIL", images_per_second(reference, args.batches)))
                del reference

    print(f"\nloader throughput, batch {args.batch}, {args.threads} threads/workers, {os.cpu_count()} cores")
    print(f"{'shards -> output':<32} {'loader':<16} {'images/s':>9}")
    for name, loader, rate in rows:
        print(f"{name:<32} {loader:<16} {rate:>9.0f}")


if __name__ == "__main__":
    main()

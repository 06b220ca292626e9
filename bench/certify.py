"""Randomized-smoothing certification speed: images/s of CERTIFY at N = 10,000 (n0 = 100).

    .venv/bin/python -m bench.certify                                   # tiny ViT, 28 px, CPU, fp32
    .venv/bin/python -m bench.certify --encoder vit_large_patch16 --dtype bf16 --batch 1000   # a GPU

Random weights (the count of forwards does not depend on them). Each image costs n0 + N
forwards of the base classifier in batches of --batch noisy copies; the table gives certified
images/s and noisy forwards/s.
"""

from __future__ import annotations

import sys

if not __package__:
    sys.exit("run from the repository root as: python -m bench.certify")

import argparse
import time

import torch

from robustmim.config import load_config
from pipeline.models.classifier import ViTClassifier
from pipeline.models.config import ClassifierConfig
from eval.certify import certify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="vit_tiny_patch4")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.encoder.startswith("vit_tiny")
    size, channels = (28, 1) if tiny else (224, 3)
    cfg = load_config(ClassifierConfig, None, [f"encoder={args.encoder}", f"img_size={size}", f"in_chans={channels}",
                                               f"pixel_mean={[0.5] * channels}", f"pixel_std={[0.5] * channels}",
                                               "num_classes=10" if tiny else "num_classes=1000"])
    model = ViTClassifier(cfg).to(device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    images = torch.rand(args.images + 1, channels, size, size, device=device)
    with autocast:
        certify(model, images[0], 0.25, 10, args.batch, 0.001, args.batch, torch.Generator(device).manual_seed(0),
                torch.Generator(device).manual_seed(1), cfg.num_classes)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for i in range(1, args.images + 1):
            certify(model, images[i], 0.25, args.n0, args.n, 0.001, args.batch,
                    torch.Generator(device).manual_seed(2 * i), torch.Generator(device).manual_seed(2 * i + 1),
                    cfg.num_classes)
        elapsed = time.perf_counter() - started  # certify reads its counts on the host: synchronized
    rate = args.images / elapsed
    print(f"| model | device | dtype | N | n0 | batch | s/image | certified images/s | noisy forwards/s |")
    print(f"|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.encoder} ({size} px) | {device.type} ({torch.get_num_threads()} threads) | {args.dtype} | {args.n} | "
          f"{args.n0} | {args.batch} | {elapsed / args.images:.2f} | {rate:.3f} | {rate * (args.n + args.n0):,.0f} |")


if __name__ == "__main__":
    main()

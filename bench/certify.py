"""Randomized-smoothing certification speed: images/s of CERTIFY at N = 10,000 (n0 = 100).

    .venv/bin/python -m bench.certify                                   # tiny ViT, 28 px, CPU, fp32
    .venv/bin/python -m bench.certify --encoder vit_large_patch16 --dtype bf16 --batch 1000   # a GPU

Random weights (the count of forwards does not depend on them). Each image costs n0 + N
forwards of the base classifier in batches of --batch noisy copies; the table gives certified
images/s and noisy forwards/s.
"""

from __future__ import annotations

import argparse
import time

import torch

from robustmim.config import load_config
from robustmim.pipeline.models.classifier import ViTClassifier
from robustmim.pipeline.engine.config import compiles
from robustmim.pipeline.models.config import ClassifierConfig
from robustmim.pipeline.models.vit import compile_blocks
from robustmim.eval.certify import certify


def measure(encoder: str, images: int, n: int, n0: int, batch: int, dtype: str = "auto",
            compile: bool | None = None) -> dict:
    """Seconds per certified image and noisy forwards/s, in `dtype` and with `compile` (auto /
    None: what eval uses, bf16 and compiled blocks on GPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    tiny = encoder.startswith("vit_tiny")
    size, channels = (28, 1) if tiny else (224, 3)
    cfg = load_config(ClassifierConfig, None, [f"encoder={encoder}", f"img_size={size}", f"in_chans={channels}",
                                               f"pixel_mean={[0.5] * channels}", f"pixel_std={[0.5] * channels}",
                                               "num_classes=10" if tiny else "num_classes=1000"])
    model = ViTClassifier(cfg).to(device).eval().requires_grad_(False)
    compiled = compiles(compile, device.type == "cuda")
    if compiled:
        compile_blocks(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    pictures = torch.rand(images + 1, channels, size, size, device=device)
    with autocast:
        certify(model, pictures[0], 0.25, 10, batch, 0.001, batch, torch.Generator(device).manual_seed(0),
                torch.Generator(device).manual_seed(1), cfg.num_classes)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for i in range(1, images + 1):
            certify(model, pictures[i], 0.25, n0, n, 0.001, batch, torch.Generator(device).manual_seed(2 * i),
                    torch.Generator(device).manual_seed(2 * i + 1), cfg.num_classes)
        elapsed = time.perf_counter() - started  # certify reads its counts on the host: synchronized
    rate = images / elapsed
    return {"encoder": f"{encoder} ({size} px)", "device": f"{device.type} ({torch.get_num_threads()} threads)",
            "dtype": dtype, "compiled": compiled, "n": n, "n0": n0, "batch": batch, "s_per_image": elapsed / images,
            "images_per_s": rate, "forwards_per_s": rate * (n + n0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="vit_tiny_patch4")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: what `robustmim eval` uses (bf16 autocast on GPU, fp32 on CPU)")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default="auto",
                        help="compile the classifier's blocks (auto: what `robustmim eval` does, on GPU only)")
    args = parser.parse_args()
    r = measure(args.encoder, args.images, args.n, args.n0, args.batch, args.dtype,
                {"auto": None, "true": True, "false": False}[args.compile])
    print("| model | device | dtype | compiled | N | n0 | batch | s/image | certified images/s | noisy forwards/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {r['encoder']} | {r['device']} | {r['dtype']} | {r['compiled']} | {r['n']} | {r['n0']} | {r['batch']} | "
          f"{r['s_per_image']:.2f} | {r['images_per_s']:.3f} | {r['forwards_per_s']:,.0f} |")


if __name__ == "__main__":
    main()

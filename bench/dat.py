"""What DAT costs per fine-tuning step against the standard recipe, and the VQGAN's share.

    .venv/bin/python -m bench.dat                    # tiny ViT + the tiny tokenizer's architecture, CPU fp32
    .venv/bin/python -m bench.dat --encoder vit_large_patch16 --tokenizer f8_16384 --batch 32 --dtype bf16  # a GPU

Rows: the standard recipe's step, DAT's step, and one VQGAN round trip (DAT runs two per step,
without gradients). Each: median of --steps timed steps after --warmup, optimizer step included.
Weights are random: speed does not depend on them. FLOPs per image from pipeline/flops.py.
"""

from __future__ import annotations

import sys

if not __package__:  # it imports bench.step's helpers: bench/ must be importable as a package
    sys.exit("run from the repository root as: python -m bench.dat")

import argparse

import torch

from robustmim.config import load_config
from bench.step import matmul_peak, median_seconds
from robustmim.pipeline.finetune.config import FinetuneConfig
from robustmim.pipeline.finetune.recipes import DiscreteAdversarial, Recipe
from robustmim.pipeline.finetune.task import FinetuneModule, finetune_flops_per_image
from robustmim.pipeline.flops import PEAK_TFLOPS_DENSE_BF16, vqgan_flops
from robustmim.pipeline.models.classifier import ViTClassifier
from robustmim.pipeline.models.config import PRESETS
from robustmim.pipeline.models.vqgan import VQGAN, reconstruct
from robustmim.pipeline.randomness import step_generator
from robustmim.pipeline.tokenizer.config import TokenizerConfig

TINY_TOKENIZER = "configs/tokenizer/tiny_fmnist.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="vit_tiny_patch4")
    parser.add_argument("--tokenizer", default="tiny", help=f"tiny ({TINY_TOKENIZER}) or a preset: {sorted(PRESETS)}")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tiny = args.encoder.startswith("vit_tiny")
    size, channels = (28, 1) if tiny else (224, 3)
    tokenizer_cfg = (load_config(TokenizerConfig, TINY_TOKENIZER, ["out_dir=x"]).model if args.tokenizer == "tiny"
                     else PRESETS[args.tokenizer])
    base = ["out_dir=x", "data.shards=x", f"data.image_size={size}", f"data.channels={channels}", "init=",
            f"model.encoder={args.encoder}", f"model.img_size={size}",
            f"model.in_chans={channels}", f"model.pixel_mean={[0.5] * channels}",
            f"model.pixel_std={[0.5] * channels}", "model.num_classes=1000", "recipe.dat.tokenizer=x"]
    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 1024)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.encoder} at {size}px + VQGAN {args.tokenizer}, batch {args.batch}, {args.dtype}, {name}; "
          f"measured matmul {peak / 1e12:.2f} TFLOP/s; MFU against {PEAK_TFLOPS_DENSE_BF16:.0f} TFLOP/s")
    print(f"{'what':<22} {'ms/step':>9} {'images/s':>9} {'GFLOP/img':>10} {'MFU':>6}")
    torch.manual_seed(0)
    tokenizer = VQGAN(tokenizer_cfg).to(device).eval().requires_grad_(False)
    images = torch.rand(args.batch, channels, size, size, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for name in ("standard", "dat"):
        cfg = load_config(FinetuneConfig, None, [*base, f"recipe.name={name}"])
        recipe = DiscreteAdversarial(cfg.recipe, 1000, tokenizer) if name == "dat" else Recipe(cfg.recipe, 1000)
        module = FinetuneModule(ViTClassifier(cfg.model), recipe).to(device)
        optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step(index: int) -> None:
            with autocast:
                loss, _ = module(images, labels, step_generator(0, index, 0, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds = median_seconds(step, device, args.warmup, args.steps)
        flops = finetune_flops_per_image(cfg, recipe)
        print(f"{name + ' step':<22} {seconds * 1e3:>9.1f} {args.batch / seconds:>9.0f} {flops / 1e9:>10.2f} "
              f"{args.batch / seconds * flops / (PEAK_TFLOPS_DENSE_BF16 * 1e12):>6.1%}")
        module = recipe = optimizer = step = None  # the next recipe's model is built without this one alive

    def round_trip(index: int) -> None:
        with torch.no_grad(), autocast:
            reconstruct(tokenizer, images)

    seconds = median_seconds(round_trip, device, args.warmup, args.steps)
    flops = vqgan_flops(tokenizer_cfg, size, train=False)
    print(f"{'VQGAN round trip':<22} {seconds * 1e3:>9.1f} {args.batch / seconds:>9.0f} {flops / 1e9:>10.2f} "
          f"{args.batch / seconds * flops / (PEAK_TFLOPS_DENSE_BF16 * 1e12):>6.1%}")


if __name__ == "__main__":
    main()

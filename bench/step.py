"""Forward+backward time and images/s per pretraining objective, with MFU.

    .venv/bin/python -m bench.step                       # tiny config, fp32, CPU
    .venv/bin/python -m bench.step --encoder vit_large_patch16 --batch 128 --dtype bf16   # a GPU

MFU is against the peak measured here: a large square matmul in the same dtype on the same
device (on an H100, bf16: ~700-790 TFLOP/s measured vs 989 dense on paper). FLOPs per image
come from pipeline/flops.py (fused-attention backward). Each row: median of --steps timed
steps after --warmup, including the optimizer step (AdamW).
"""

from __future__ import annotations

import sys

if not __package__:  # run as a file, bench/ would come first on sys.path and bench/shards.py hide `shards`
    sys.exit("run from the repository root as: python -m bench.step")

import argparse
import statistics
import time

import torch

from robustmim.config import load_config
from pipeline.flops import training_flops_per_image
from pipeline.models.config import ModelConfig
from pipeline.models.mae import MaskedAutoencoder
from pipeline.objectives import ObjectiveConfig, build_objective, step_generator


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n matmul, best of a few."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * n**3 / best


def median_seconds(run, device: torch.device, warmup: int, steps: int) -> float:
    """Median wall time of `run(step)` over `steps` calls after `warmup` untimed ones."""
    times = []
    for step in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        run(step)
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_steps(objective, model, optimizer, images, device, dtype, warmup: int, steps: int) -> float:
    def step(index: int) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = objective(model, images, step_generator(0, index, 0, device))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    return median_seconds(step, device, warmup, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="vit_tiny_patch4")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--objectives", default="mae,nim,dmae,mimir")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tiny = args.encoder.startswith("vit_tiny")
    img_size = args.img_size or (28 if tiny else 224)
    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 1024)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.encoder} at {img_size}px, batch {args.batch}, {args.dtype}, {name}; "
          f"measured matmul peak {peak / 1e12:.2f} TFLOP/s")
    print(f"{'objective':<9} {'decoder':<7} {'ms/step':>9} {'images/s':>9} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for objective_name in args.objectives.split(","):
        decoder = "mimir" if objective_name == "mimir" else "mae"
        if tiny:
            decoder = "tiny"
        channels = 1 if tiny else 3
        model_cfg = load_config(ModelConfig, None, [
            f"encoder={args.encoder}", f"decoder={decoder}", f"img_size={img_size}", f"in_chans={channels}",
            f"pixel_mean={[0.5] * channels}", f"pixel_std={[0.5] * channels}"])
        objective_cfg = load_config(ObjectiveConfig, None, [f"name={objective_name}"])
        torch.manual_seed(0)
        model = MaskedAutoencoder(model_cfg).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
        images = torch.rand(args.batch, channels, img_size, img_size, device=device)
        seconds = time_steps(build_objective(objective_cfg), model, optimizer, images, device, dtype,
                             args.warmup, args.steps)
        flops = training_flops_per_image(model_cfg, objective_cfg, args.batch)
        rate = args.batch / seconds
        achieved = rate * flops
        print(f"{objective_name:<9} {decoder:<7} {seconds * 1e3:>9.1f} {rate:>9.0f} {flops / 1e9:>10.2f} "
              f"{achieved / 1e12:>8.3f} {achieved / peak:>6.1%}")
        del model, optimizer


if __name__ == "__main__":
    main()

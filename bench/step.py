"""Forward+backward time and images/s per pretraining objective, with MFU.

    .venv/bin/python -m bench.step                       # tiny config, fp32, CPU
    .venv/bin/python -m bench.step --encoder vit_large_patch16 --batch 128 --dtype bf16   # a GPU

MFU is against the dense bf16 peak on paper (989 TFLOP/s per H100/H200,
`robustmim.pipeline.flops.PEAK_TFLOPS_DENSE_BF16`), the trainer's convention; the share of a large
square matmul measured on the same device and dtype is printed beside it. FLOPs per image come
from pipeline/flops.py (fused-attention backward). Each row: median of --steps timed steps
after --warmup, including the optimizer step (fused AdamW on CUDA), and the peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from robustmim.config import load_config
from robustmim.pipeline.flops import PEAK_TFLOPS_DENSE_BF16
from robustmim.pipeline.models.config import ModelConfig
from robustmim.pipeline.models.mae import MaskedAutoencoder
from robustmim.pipeline.objectives.config import ObjectiveConfig
from robustmim.pipeline.objectives.registry import build_objective
from robustmim.pipeline.pretrain.flops import pretraining_flops_per_image
from robustmim.pipeline.randomness import step_generator


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


def measure(encoder: str, objectives: list[str], batch: int, dtype_name: str, warmup: int, steps: int,
            compile_blocks_too: bool = False, batches: dict[str, int] | None = None) -> list[dict]:
    """One row per objective (and per compiled variant): images/s, MFU, peak memory."""
    from robustmim.pipeline.models.vit import compile_blocks

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    tiny = encoder.startswith("vit_tiny")
    img_size, channels = (28, 1) if tiny else (224, 3)
    rows = []
    for objective_name in objectives:
        for compiled in ((False, True) if compile_blocks_too else (False,)):
            decoder = "tiny" if tiny else ("mimir" if objective_name == "mimir" else "mae")
            model_cfg = load_config(ModelConfig, None, [
                f"encoder={encoder}", f"decoder={decoder}", f"img_size={img_size}", f"in_chans={channels}",
                f"pixel_mean={[0.5] * channels}", f"pixel_std={[0.5] * channels}"])
            objective_cfg = load_config(ObjectiveConfig, None, [f"name={objective_name}"])
            size = (batches or {}).get(objective_name, batch)
            torch.manual_seed(0)
            model = MaskedAutoencoder(model_cfg).to(device)
            if compiled:
                compile_blocks(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                          fused=device.type == "cuda")
            images = torch.rand(size, channels, img_size, img_size, device=device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            seconds = time_steps(build_objective(objective_cfg), model, optimizer, images, device, dtype,
                                 warmup + (2 if compiled else 0), steps)
            flops = pretraining_flops_per_image(model_cfg, objective_cfg, size)
            rate = size / seconds
            rows.append({"objective": objective_name, "decoder": decoder, "batch": size, "compiled": compiled,
                         "ms_per_step": seconds * 1e3, "images_per_s": rate, "gflop_per_image": flops / 1e9,
                         "tflops": rate * flops / 1e12, "mfu": rate * flops / (PEAK_TFLOPS_DENSE_BF16 * 1e12),
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                         else float("nan")})
            del model, optimizer
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="vit_tiny_patch4")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--objectives", default="mae,nim,dmae,mimir")
    parser.add_argument("--compile", action="store_true", help="also time each objective with compiled blocks")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 1024)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.encoder}, batch {args.batch}, {args.dtype}, {name}; measured matmul {peak / 1e12:.2f} TFLOP/s; "
          f"MFU against {PEAK_TFLOPS_DENSE_BF16:.0f} TFLOP/s")
    print(f"{'objective':<9} {'compiled':>8} {'ms/step':>9} {'images/s':>9} {'GFLOP/img':>10} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'of matmul':>9} {'peak GiB':>9}")
    for r in measure(args.encoder, args.objectives.split(","), args.batch, args.dtype, args.warmup, args.steps,
                     args.compile):
        print(f"{r['objective']:<9} {str(r['compiled']):>8} {r['ms_per_step']:>9.1f} {r['images_per_s']:>9.0f} "
              f"{r['gflop_per_image']:>10.2f} {r['tflops']:>8.3f} {r['mfu']:>6.1%} {r['tflops'] * 1e12 / peak:>9.1%} "
              f"{r['peak_gib']:>9.1f}")


if __name__ == "__main__":
    main()

"""Step time of DeepSpeed ZeRO 1/2/3 against plain PyTorch DDP: same model, ranks, batches,
precision and accumulation.

    .venv/bin/python -m bench.engine [--nproc N] [--encoder vit_tiny_patch4] [--batch 64] [--accumulation 2]

Each mode runs in its own torchrun launch (gloo on CPU, NCCL on GPU; one rank per GPU, 2 on a
CPU machine by default) on synthetic batches held in memory, so only the engine differs: MAE
objective, AdamW, bf16 autocast on GPU for every mode, DeepSpeed configured as the trainer
configures it (`robustmim.pipeline.engine.trainer.deepspeed_config`), DDP skipping the all-reduce on all
but the last micro-step. Median of --steps optimizer steps after warm-up. Target: ZeRO-1 within
10% of DDP.
"""

from __future__ import annotations

import sys


import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import time

MODES = ("ddp", "zero1", "zero2", "zero3")


def worker(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from robustmim.config import load_config
    from robustmim.pipeline.dist import detect_env, init_distributed
    from robustmim.pipeline.pretrain.config import PretrainConfig
    from robustmim.pipeline.pretrain.task import PretrainModule
    from robustmim.pipeline.engine.trainer import deepspeed_config
    from robustmim.pipeline.models.config import ModelConfig
    from robustmim.pipeline.models.mae import MaskedAutoencoder
    from robustmim.pipeline.randomness import step_generator
    from robustmim.pipeline.objectives.config import ObjectiveConfig
    from robustmim.pipeline.objectives.registry import build_objective

    env = detect_env()
    on_gpu = torch.cuda.is_available()
    init_distributed(env, on_gpu)
    device = torch.device("cuda", env.local_rank) if on_gpu else torch.device("cpu")
    tiny = args.encoder.startswith("vit_tiny")
    size, channels = (28, 1) if tiny else (224, 3)
    model_cfg = load_config(ModelConfig, None, [f"encoder={args.encoder}", f"decoder={'tiny' if tiny else 'mae'}",
                                                f"img_size={size}", f"in_chans={channels}",
                                                f"pixel_mean={[0.5] * channels}", f"pixel_std={[0.5] * channels}"])
    torch.manual_seed(0)
    module = PretrainModule(MaskedAutoencoder(model_cfg), build_objective(load_config(ObjectiveConfig))).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=on_gpu or None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu)
    if args.mode == "ddp":
        engine = torch.nn.parallel.DistributedDataParallel(module, device_ids=[env.local_rank] if on_gpu else None)

        def step(images, generators):
            for micro, generator in enumerate(generators):
                last = micro == len(generators) - 1
                with (contextlib.nullcontext() if last else engine.no_sync()), autocast:
                    loss, _ = engine(images, None, generator)
                (loss / len(generators)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        cfg = load_config(PretrainConfig, None, [
            "out_dir=unused", "data.shards=unused", f"zero_stage={args.mode[-1]}", f"micro_batch={args.batch}",
            f"global_batch={args.batch * args.accumulation * env.world_size}"])
        config = deepspeed_config(cfg, args.accumulation, bf16=on_gpu, universal=False)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                               dist_init_required=False)

        def step(images, generators):
            for generator in generators:
                loss, _ = engine(images, None, generator)
                engine.backward(loss)
                engine.step()

    images = torch.rand(args.batch, channels, size, size, device=device)
    times = []
    for i in range(args.warmup + args.steps):
        generators = [step_generator(0, i * args.accumulation + m, env.rank, device) for m in range(args.accumulation)]
        dist.barrier()
        start = time.perf_counter()
        step(images, generators)
        if on_gpu:
            torch.cuda.synchronize(device)
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if env.rank == 0:
        print("RESULT " + json.dumps({"mode": args.mode, "median_s": statistics.median(times)}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=0, help="ranks (0: one per GPU, or 2 on a CPU machine)")
    parser.add_argument("--encoder", default="vit_tiny_patch4")
    parser.add_argument("--batch", type=int, default=64, help="micro-batch per rank")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-steps per optimizer step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # set for the workers
    args = parser.parse_args()
    if args.mode:
        return worker(args)
    if not args.nproc:
        import torch

        args.nproc = torch.cuda.device_count() or 2
    results = {}
    for mode in MODES:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                   "--master_port", str(port), "-m", "bench.engine", "--mode", mode, "--encoder", args.encoder,
                   "--batch", str(args.batch), "--accumulation", str(args.accumulation), "--warmup", str(args.warmup),
                   "--steps", str(args.steps)]
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{mode} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        results[mode] = json.loads(line[len("RESULT "):])["median_s"]
    ddp = results["ddp"]
    print(f"\nengine step time: {args.encoder}, {args.nproc} ranks x micro-batch {args.batch} x {args.accumulation} "
          f"micro-steps, MAE objective")
    print(f"{'engine':<8} {'ms/step':>9} {'images/s':>9} {'vs DDP':>7}")
    for mode, seconds in results.items():
        images = args.nproc * args.batch * args.accumulation
        print(f"{mode:<8} {seconds * 1e3:>9.1f} {images / seconds:>9.0f} {seconds / ddp:>7.2f}x")


if __name__ == "__main__":
    main()

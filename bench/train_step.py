"""Images/s of `robustmim pretrain`'s own training step: the Trainer (DeepSpeed ZeRO, gradient
accumulation, the interval all-reduce, logging) on one device, fed synthetic batches.

    .venv/bin/python -m bench.train_step                                   # tiny ViT, CPU, fp32
    python -m bench.train_step --encoder vit_large_patch16 --objectives mae,dmae,mimir,nim   # a GPU

The loader is replaced by batches already on the device (DALI may be absent where this runs,
and its speed is `bench.loader`'s business), so the figure is the engine's step with a
perfect loader: compare it with `bench.step`'s model-only ceiling. Images/s and MFU are the
Trainer's own log (MFU against the dense bf16 peak, `robustmim.pipeline.flops.PEAK_TFLOPS_DENSE_BF16`),
the median over log intervals after the first. Each objective trains in a child process, so
the peak memory is its own.
"""

from __future__ import annotations

import sys


import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

COMPILE = {"auto": "null", "true": "true", "false": "false"}  # --compile -> the engine's `compile` key
# objective -> (decoder, micro-batch) at ViT-L: the shipped configs' choices
VIT_L = {"mae": ("mae", 256), "dmae": ("mae", 256), "mimir": ("mimir", 256), "nim": ("mae", 128)}


class SyntheticLoader:
    """DaliLoader's interface over one fixed batch of random [0, 1] images on the device."""

    def __init__(self, cfg, rank=0, world_size=1, local_rank=0, train=True, state=None):
        import torch

        from robustmim.pipeline.data.dali import Batch, use_gpu

        device = torch.device("cuda", local_rank) if use_gpu(cfg.device) else torch.device("cpu")
        generator = torch.Generator(device).manual_seed(cfg.seed + rank)
        self.batch = Batch(torch.rand(cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size, device=device,
                                      generator=generator),
                           torch.zeros(cfg.batch_size, dtype=torch.long, device=device))

    def __next__(self):
        return self.batch

    def state_dict(self) -> dict:
        return {}


def synthetic_shards(root: Path, size: int, channels: int) -> Path:
    """A few real shards for the manifest the Trainer opens (its split size sets the epoch count)."""
    from robustmim.config import load_config
    from robustmim.shards.build import build_shards
    from robustmim.shards.config import ShardsConfig
    from robustmim.shards.synthetic import make_image_tree

    tree = make_image_tree(root / "tree", classes=2, train_per_class=8, val_per_class=0, min_size=size,
                           max_size=size, seed=0)
    out = root / "shards"
    build_shards(load_config(ShardsConfig, None, ["source=imagenet", f"input={tree.root}", f"out_dir={out}",
                                                  "splits=[train]", "workers=1"]))
    return out


def child(args) -> None:
    """One objective's run in this process; prints a RESULT line."""
    import torch

    from robustmim.config import load_config
    from robustmim.pipeline.dist import detect_env, init_distributed, shutdown_distributed
    from robustmim.pipeline.pretrain.config import PretrainConfig
    from robustmim.pipeline.engine.metrics import read_metrics
    from robustmim.pipeline.pretrain.task import PretrainTask
    from robustmim.pipeline.engine.trainer import Trainer

    tiny = args.encoder.startswith("vit_tiny")
    size, channels = (28, 1) if tiny else (224, 3)
    decoder, micro = ("tiny", args.micro or 32) if tiny else (VIT_L[args.objective][0], args.micro or
                                                                VIT_L[args.objective][1])
    steps = args.intervals * args.log_every
    out_dir = Path(args.workdir) / f"run_{args.objective}"
    overrides = [f"out_dir={out_dir}", f"data.shards={args.shards}", "data.split=train", f"data.image_size={size}",
                 f"data.channels={channels}", f"model.encoder={args.encoder}", f"model.decoder={decoder}",
                 f"model.img_size={size}", f"model.in_chans={channels}", f"model.pixel_mean={[0.5] * channels}",
                 f"model.pixel_std={[0.5] * channels}", f"objective.name={args.objective}",
                 f"micro_batch={micro}", f"global_batch={micro * args.accumulation}",
                 f"length.samples={micro * args.accumulation * steps}", f"log_every={args.log_every}",
                 f"zero_stage={args.zero_stage}", f"compile={COMPILE[args.compile]}", f"precision={args.precision}",
                 "optim.warmup_epochs=0", f"checkpoint.every_steps={10 * steps}", "checkpoint.keep_last=1"]
    cfg = load_config(PretrainConfig, None, overrides)
    env = detect_env()
    on_gpu = torch.cuda.is_available()
    init_distributed(env, on_gpu)
    try:
        trainer = Trainer(cfg, PretrainTask, env, on_gpu, loader_class=SyntheticLoader)
        trainer.run()
        trainer.lock.release()
    finally:
        shutdown_distributed()
    rows = [r for r in read_metrics(out_dir) if "images_per_s" in r][1:]  # the first interval compiles/warms up
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    print("RESULT " + json.dumps({"objective": args.objective, "micro": micro, "accumulation": args.accumulation,
                                  "precision": args.precision, "compiled": cfg.compiles(on_gpu),
                                  "images_per_s": statistics.median(r["images_per_s"] for r in rows),
                                  "mfu": statistics.median(r["mfu"] for r in rows), "peak_gib": peak}), flush=True)


def measure(objective: str, args, shards: Path, workdir: str) -> dict:
    command = [sys.executable, "-m", "bench.train_step", "--child", "--objective", objective, "--encoder",
               args.encoder, "--shards", str(shards), "--workdir", workdir, "--accumulation", str(args.accumulation),
               "--intervals", str(args.intervals), "--log-every", str(args.log_every), "--zero-stage",
               str(args.zero_stage), "--micro", str(args.micro or 0), "--precision", args.precision] + \
        ["--compile", args.compile]
    try:  # a hung child (a stuck collective, say) must not eat the rest of a GPU lease
        out = subprocess.run(command, capture_output=True, text=True, timeout=args.child_timeout_s,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{objective} took over {args.child_timeout_s:.0f} s:\n{str(e.stdout or '')[-2000:]}")
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{objective} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="vit_tiny_patch4")
    p.add_argument("--objectives", default="mae,dmae,mimir,nim")
    p.add_argument("--micro", type=int, default=0, help="micro-batch (0: the configs' choice; 32 for tiny)")
    p.add_argument("--accumulation", type=int, default=2, help="micro-steps per optimizer step")
    p.add_argument("--intervals", type=int, default=4, help="log intervals timed (the first is dropped)")
    p.add_argument("--log-every", type=int, default=3)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--compile", default="auto", choices=sorted(COMPILE),
                   help="compile the transformer blocks (auto: the engine's default, on GPU only)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "bf16_weights"],
                   help="the engine's precision (auto: bf16 autocast on GPU, fp32 on CPU)")
    p.add_argument("--child-timeout-s", type=float, default=600.0, help="stop one objective's run after this long")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--objective", help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p


def run(args) -> list[dict]:
    tiny = args.encoder.startswith("vit_tiny")
    with tempfile.TemporaryDirectory() as workdir:
        shards = synthetic_shards(Path(workdir), 28 if tiny else 224, 1 if tiny else 3)
        return [measure(objective, args, shards, workdir) for objective in args.objectives.split(",")]


def main() -> None:
    args = parser().parse_args()
    if args.child:
        return child(args)
    results = run(args)
    print(f"\nrobustmim pretrain's step: {args.encoder}, ZeRO-{args.zero_stage}, {args.accumulation} micro-steps per "
          f"step, precision {args.precision}, compile {args.compile}")
    print(f"{'objective':<9} {'micro':>6} {'images/s':>9} {'MFU':>6} {'peak GiB':>9}")
    for r in results:
        print(f"{r['objective']:<9} {r['micro']:>6} {r['images_per_s']:>9.0f} {r['mfu']:>6.1%} {r['peak_gib']:>9.1f}")


if __name__ == "__main__":
    main()

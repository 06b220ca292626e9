"""`robustmim pretrain` and `robustmim export`."""

from __future__ import annotations

import argparse
import os
import socket
import sys


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (configs/pretrain/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. zero_stage=3")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="start this many local ranks with torchrun (not needed under torchrun or srun)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pretrain(args: argparse.Namespace) -> int:
    from robustmim.config import load_config
    from pipeline.dist import detect_env
    from pipeline.engine.config import PretrainConfig

    cfg = load_config(PretrainConfig, args.config, args.overrides)  # errors before any launch
    if args.nproc_per_node > 1 and detect_env().launcher == "single":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc_per_node),
                   "--master_port", str(_free_port()), "-m", "robustmim.cli", "pretrain",
                   *(["--config", args.config] if args.config else []), *args.overrides]
        os.execv(sys.executable, command)  # torchrun takes this process's place (and its signals)
    from pipeline.engine.trainer import train

    result = train(cfg)
    if detect_env().rank == 0:
        print(f"pretrain: step {result['step']}/{result['total_steps']}, {result['samples_seen']} samples, "
              f"checkpoint {cfg.run_dir}/checkpoints/{result['checkpoint']}", flush=True)
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run directory, its checkpoints/ or one step_* directory")
    parser.add_argument("--out", required=True, help="output .safetensors file")


def run_export(args: argparse.Namespace) -> int:
    from pipeline.engine.export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {info['tensors']} tensors from {info['source']} (step {info['step']}) to {args.out}")
    return 0

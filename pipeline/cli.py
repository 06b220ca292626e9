"""`robustmim pretrain`, `robustmim finetune`, `robustmim tokenizer` and `robustmim export`."""

from __future__ import annotations

import argparse
import os
import socket
import sys

# stage -> (config class, training function), as "module:name" so --help imports nothing heavy
TRAINING_STAGES = {
    "pretrain": ("pipeline.engine.config:PretrainConfig", "pipeline.engine.pretrain:pretrain"),
    "finetune": ("pipeline.finetune.config:FinetuneConfig", "pipeline.finetune.task:finetune"),
    "tokenizer": ("pipeline.tokenizer.config:TokenizerConfig", "pipeline.tokenizer.task:train_tokenizer"),
}


def resolve(reference: str):
    import importlib

    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (configs/<stage>/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. zero_stage=3")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="start this many local ranks with torchrun (not needed under torchrun or srun)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exec_torchrun(stage: str, nproc_per_node: int, config: str | None, overrides: list[str]) -> None:
    """Replace this process with torchrun starting `nproc_per_node` ranks of `robustmim <stage>`
    (it takes over this process's signals); returns only when nothing needs starting."""
    from pipeline.dist import detect_env

    if nproc_per_node <= 1 or detect_env().launcher != "single":
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node),
               "--master_port", str(_free_port()), "-m", "robustmim.cli", stage,
               *(["--config", config] if config else []), *overrides]
    os.execv(sys.executable, command)


def format_validation(record: dict) -> str:
    """'top-1 0.4310 on 2000 images' (a classifier) or 'recon_mse 0.0071, perplexity 61.2, ...'."""
    samples = f"on {record['val_samples']:.0f} images"
    if "val_top1" in record:
        return f"top-1 {record['val_top1']:.4f} {samples}"
    values = [f"{k[4:]} {v:.4g}" for k, v in record.items() if k.startswith("val_") and k != "val_samples"]
    return f"{', '.join(values)} {samples}"


def run_training(args: argparse.Namespace) -> int:
    from robustmim.config import load_config
    from pipeline.dist import detect_env

    stage = args.command
    config_class, train = (resolve(ref) for ref in TRAINING_STAGES[stage])
    cfg = load_config(config_class, args.config, args.overrides)  # errors before any launch
    exec_torchrun(stage, args.nproc_per_node, args.config, args.overrides)
    result = train(cfg)
    if detect_env().rank == 0:
        print(f"{stage}: step {result['step']}/{result['total_steps']}, {result['samples_seen']} samples, "
              f"checkpoint {cfg.run_dir}/checkpoints/{result['checkpoint']}", flush=True)
        if result["validation"]:
            print(f"{stage}: validation at step {result['validation']['step']}: "
                  f"{format_validation(result['validation'])}", flush=True)
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run directory, its checkpoints/ or one step_* directory")
    parser.add_argument("--out", required=True, help="output .safetensors file (a .json is written beside it)")


def run_export(args: argparse.Namespace) -> int:
    from pipeline.engine.export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {info['tensors']} tensors from {info['source']} (step {info['step']}) to {args.out}")
    return 0

"""`robustmim pretrain`, `robustmim finetune`, `robustmim tokenizer` and `robustmim export`."""

from __future__ import annotations

import argparse
import os
import sys
import time

from robustmim.config_help import add_config_arguments
from robustmim.launcher import (EXIT_STOPPED, SUPERVISED_ENV, add_resume_argument, explain_failed_ranks,
                                launch_local_ranks, with_resume)
from robustmim.stages import resolve, stage_named


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "configs/<stage>/*.yaml", "zero_stage=1 micro_batch=128")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="start this many local ranks with torchrun (not needed under torchrun or srun)")
    add_resume_argument(parser)


def run_training(args: argparse.Namespace) -> int:
    from robustmim.config import load_config
    from robustmim.config_help import describe_config
    from robustmim.errors import UserError
    from robustmim.pipeline.dist import detect_env
    from robustmim.pipeline.engine.metrics import format_validation
    from robustmim.pipeline.engine.run_state import read_run_state

    stage = args.command
    config_class = resolve(stage_named(stage).config)
    args.overrides = with_resume(args.overrides, args.resume)
    if args.print_config:
        print(describe_config(config_class, args.config, args.overrides), end="")
        return 0
    cfg = load_config(config_class, args.config, args.overrides)  # errors before any launch
    if args.nproc_per_node > 1:
        try:
            cfg.accumulation(args.nproc_per_node)
        except ValueError as e:
            raise UserError(f"--nproc-per-node {args.nproc_per_node}: {e}") from None
    launched = time.time()
    status = launch_local_ranks(stage, args.nproc_per_node, args.config, args.overrides,
                                on_crash=lambda: explain_failed_ranks(stage, cfg.data.shards, cfg.data.split))
    if status is not None:  # the ranks ran in torchrun's children and said what they had to
        state = read_run_state(cfg.out_dir)
        stopped = state.get("state") == "stopped" and state.get("time", 0) >= launched
        if stopped and status in (0, EXIT_STOPPED):
            print(f"{stage}: stopped by {state['stopped_by']} at step {state['step']}/{state['total_steps']} "
                  f"(exit status {EXIT_STOPPED}); re-run the same command to resume", file=sys.stderr, flush=True)
            return EXIT_STOPPED
        return status
    # the training code (torch, DeepSpeed, DALI) is imported here, by the ranks, not by a launching
    # command: it would cost seconds before every launch
    result = resolve(stage_named(stage).train)(cfg)
    if detect_env().rank == 0:
        print(f"{stage}: step {result['step']}/{result['total_steps']}, {result['samples_seen']} samples, "
              f"checkpoint {cfg.out_dir}/checkpoints/{result['checkpoint']}", flush=True)
        if result["validation"]:
            print(f"{stage}: validation at step {result['validation']['step']}: "
                  f"{format_validation(result['validation'])}", flush=True)
        if result["stopped_by"] and SUPERVISED_ENV not in os.environ:
            print(f"{stage}: stopped before the end (exit status {EXIT_STOPPED}); re-run the same command to "
                  f"resume", flush=True)
    return EXIT_STOPPED if result["stopped_by"] and SUPERVISED_ENV not in os.environ else 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run directory, its checkpoints/ or one step_* directory")
    parser.add_argument("--out", required=True, help="output .safetensors file (a .json is written beside it)")


def run_export(args: argparse.Namespace) -> int:
    from robustmim.pipeline.engine.export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {info['tensors']} tensors from {info['source']} (step {info['step']}) to {args.out}")
    return 0

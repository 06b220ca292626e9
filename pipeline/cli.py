"""`robustmim pretrain`, `robustmim finetune`, `robustmim tokenizer` and `robustmim export`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from robustmim.config_help import add_config_arguments

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
    add_config_arguments(parser, "configs/<stage>/*.yaml", "zero_stage=1 micro_batch=128")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="start this many local ranks with torchrun (not needed under torchrun or srun)")
    add_resume_argument(parser)


RESUME_HELP = ("latest (default): continue from run_dir's newest checkpoint; none: start at step 0 (refused when "
               "run_dir holds checkpoints); or a step_* directory of any run to start from (checkpoint.resume)")


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", metavar="latest|none|PATH", help=RESUME_HELP)


def with_resume(overrides: list[str], resume: str | None) -> list[str]:
    """The overrides with `--resume` as the `checkpoint.resume` key (after them: the flag wins)."""
    return [*overrides, f"checkpoint.resume={resume}"] if resume else list(overrides)


# Exit status of a training run stopped by a signal (preemption, time-limit warning, Ctrl-C
# through SIGTERM) after writing its checkpoint: EX_TEMPFAIL, "try again later". Re-running the
# same command resumes. Scripts and Slurm epilogs tell it from 0 (finished) and 1/2 (failed).
EXIT_STOPPED = 75
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# Set for the ranks `launch_local_ranks` starts: they exit 0 when stopped and this process, which
# reads run_state.json, returns EXIT_STOPPED (torchrun would report their 75 as a crash).
SUPERVISED_ENV = "ROBUSTMIM_SUPERVISED_BY"


def launch_local_ranks(stage: str, nproc_per_node: int, config: str | None, overrides: list[str]) -> int | None:
    """Run `nproc_per_node` ranks of `robustmim <stage>` under torchrun as a child and return its
    exit status; None when nothing needs starting (one rank, or already under a launcher).

    Stop signals sent to this process go straight to the ranks (torchrun would give them 30 s
    before killing them, less than a large checkpoint may need), so `kill <pid>` stops a local
    run as Slurm's SIGTERM does."""
    import subprocess

    import psutil

    from pipeline.dist import detect_env, free_port

    if nproc_per_node <= 1 or detect_env().launcher != "single":
        return None
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node),
               "--master_port", str(free_port()), "-m", "robustmim.cli", stage,
               *(["--config", config] if config else []), *overrides]
    # torchrun sets OMP_NUM_THREADS=1 for its ranks when unset, with a banner saying so: the
    # same value, set here, without the banner.
    child = subprocess.Popen(command, env={"OMP_NUM_THREADS": "1", **os.environ, SUPERVISED_ENV: str(os.getpid())})

    def forward(signum, frame) -> None:
        for worker in psutil.Process(child.pid).children(recursive=True):
            try:
                worker.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        return child.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group: let the ranks finish exiting
        child.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def format_validation(record: dict) -> str:
    """'top-1 0.4310 on 2000 images' (a classifier) or 'recon_mse 0.0071, perplexity 61.2, ...'."""
    samples = f"on {record['val_samples']:.0f} images"
    if "val_top1" in record:
        return f"top-1 {record['val_top1']:.4f} {samples}"
    values = [f"{k[4:]} {v:.4g}" for k, v in record.items() if k.startswith("val_") and k != "val_samples"]
    return f"{', '.join(values)} {samples}"


def run_training(args: argparse.Namespace) -> int:
    from robustmim.config import load_config
    from robustmim.config_help import describe_config
    from robustmim.errors import UserError
    from pipeline.dist import detect_env
    from pipeline.engine.run_state import read_run_state

    stage = args.command
    config_class, train = (resolve(ref) for ref in TRAINING_STAGES[stage])
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
    status = launch_local_ranks(stage, args.nproc_per_node, args.config, args.overrides)
    if status is not None:  # the ranks ran in torchrun's children and said what they had to
        state = read_run_state(cfg.run_dir)
        stopped = state.get("state") == "stopped" and state.get("time", 0) >= launched
        if stopped and status in (0, EXIT_STOPPED):
            print(f"{stage}: stopped by {state['stopped_by']} at step {state['step']}/{state['total_steps']} "
                  f"(exit status {EXIT_STOPPED}); re-run the same command to resume", file=sys.stderr, flush=True)
            return EXIT_STOPPED
        return status
    result = train(cfg)
    if detect_env().rank == 0:
        print(f"{stage}: step {result['step']}/{result['total_steps']}, {result['samples_seen']} samples, "
              f"checkpoint {cfg.run_dir}/checkpoints/{result['checkpoint']}", flush=True)
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
    from pipeline.engine.export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {info['tensors']} tensors from {info['source']} (step {info['step']}) to {args.out}")
    return 0

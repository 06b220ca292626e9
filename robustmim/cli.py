"""The `robustmim` command: one subcommand per stage, each defined in its own package.

A stage's module provides a function adding its arguments and one running it (`run(args) -> int`). Stage modules keep
heavy imports (torch, DALI, DeepSpeed) inside `run`, so `robustmim --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from robustmim.errors import UserError
from robustmim.log import quiet_libraries, setup_logging

# stage name -> (module, its add-arguments function, its run function, one-line help, an example)
STAGES = {
    "shards": ("shards.cli", "add_arguments", "run", "build, verify and summarize WebDataset shards",
               "robustmim shards build --config configs/shards/fashion_mnist.yaml out=runs/demo/shards"),
    "pretrain": ("pipeline.cli", "add_training_arguments", "run_training",
                 "pretrain an autoencoder (MAE, NIM, DMAE, MIMIR) with DeepSpeed",
                 "robustmim pretrain --config configs/pretrain/dmae_tiny_fmnist.yaml --nproc-per-node 2 "
                 "run_dir=runs/demo/pretrain_dmae data.shards=runs/demo/shards"),
    "finetune": ("pipeline.cli", "add_training_arguments", "run_training",
                 "fine-tune a pretrained encoder into each defense's classifier (standard, De3, DMAE, MIMIR, DAT)",
                 "robustmim finetune --config configs/finetune/dmae_tiny_fmnist.yaml --nproc-per-node 2 "
                 "run_dir=runs/demo/finetune_dmae init=runs/demo/dmae_tiny.safetensors"),
    "tokenizer": ("pipeline.cli", "add_training_arguments", "run_training",
                  "train a VQGAN tokenizer on the shards (the discretizer of DAT fine-tuning)",
                  "robustmim tokenizer --config configs/tokenizer/tiny_fmnist.yaml --nproc-per-node 2 "
                  "run_dir=runs/demo/tokenizer"),
    "export": ("pipeline.cli", "add_export_arguments", "run_export",
               "consolidate a checkpoint into safetensors: an autoencoder, a tokenizer, or a classifier with its "
               "deployment JSON",
               "robustmim export runs/demo/pretrain_dmae --out runs/demo/dmae_tiny.safetensors"),
    "eval": ("eval.cli", "add_eval_arguments", "run_eval_command",
             "robustness of a classifier export: clean, PGD (EOT for randomized defenses), CERTIFY / PREDICT",
             "robustmim eval --config configs/eval/tiny_fmnist.yaml --nproc-per-node 2 certify.enabled=true "
             "--model runs/demo/classifiers/dmae_tiny.json --data runs/demo/shards --out runs/demo/eval/dmae"),
    "report": ("eval.cli", "add_report_arguments", "run_report",
               "one markdown table and PNG plots from several evaluations",
               "robustmim report runs/demo/eval/standard runs/demo/eval/dmae --out runs/demo/report"),
    "study": ("eval.cli", "add_study_arguments", "run_study_command",
              "the papers' claims as paired comparisons of evaluations (exact McNemar tests, verdicts, plots)",
              "robustmim study --config configs/study/tiny_fmnist.yaml runs=runs/demo out=docs/results.md"),
    "submit": ("slurm.cli", "add_submit_arguments", "run_submit",
               "send a stage to Slurm (or the local executor) through submitit",
               "robustmim submit pretrain --config configs/pretrain/mae_vitl_in1k.yaml --nodes 4 --gpus-per-node 8 "
               "--partition gpu data.shards=/data/in1k run_dir=/scratch/mae_l --dry-run"),
    "status": ("slurm.cli", "add_status_arguments", "run_status", "show a run's jobs, last step and checkpoint",
               "robustmim status /scratch/mae_l"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustmim", description=__doc__.splitlines()[0])
    stages = parser.add_subparsers(dest="command", metavar="<stage>", required=True)
    for name, (module_name, add_arguments, run, help_text, example) in STAGES.items():
        sub = stages.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        module = importlib.import_module(module_name)
        getattr(module, add_arguments)(sub)
        sub.set_defaults(_run=getattr(module, run))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills a positional list only once: `key=value` overrides placed between options
    # (`submit pretrain --config c.yaml seed=1 --nodes 2`) come back unparsed; they are overrides.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # the rank a launcher (torchrun, srun) gave this process; 0 for the command run by hand
    setup_logging(int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0))
    quiet_libraries()
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"robustmim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robustmim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

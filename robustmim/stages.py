"""Every stage of the pipeline, in one list: the command line, `submit`, the Slurm job and
`export` are built from it, so adding a stage is one entry here.

Functions and classes are named as "module:attribute" and imported when used, so
`robustmim --help` imports nothing heavy and no package imports another's stages.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Any, Optional


class Launch(enum.Enum):
    local = "local"  # runs where it is called (one process)
    training = "training"  # ranks under torchrun or srun; `submit` sends one job that requeues itself
    array = "array"  # `submit` sends an array job, one task per chunk of the work (evaluation)
    check = "check"  # `submit` only: a distributed all-reduce smoke test of the allocation


@dataclass(frozen=True)
class Stage:
    name: str
    help: str  # one line, for `robustmim --help` and the stage's own
    example: str  # a real command, shown at the end of the stage's --help
    launch: Launch
    add_arguments: Optional[str] = None  # "module:function(parser)"; None: no command of its own
    run: Optional[str] = None  # "module:function(args) -> exit status" of the command
    config: Optional[str] = None  # "module:Class" of its typed config (training and array stages)
    train: Optional[str] = None  # training stages: "module:function(cfg) -> result" run on every rank
    export: Optional[str] = None  # "module:function(checkpoints, tag, meta, out) -> info" of its checkpoints


def resolve(reference: str) -> Any:
    """The attribute a "module:attribute" reference names (imported now)."""
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


TRAINING_ARGUMENTS = ("robustmim.pipeline.cli:add_training_arguments", "robustmim.pipeline.cli:run_training")

STAGES: tuple[Stage, ...] = (
    Stage("shards", "build, verify and summarize WebDataset shards",
          "robustmim shards build --config configs/shards/fashion_mnist.yaml out_dir=runs/demo/shards",
          Launch.local, "robustmim.shards.cli:add_arguments", "robustmim.shards.cli:run",
          config="robustmim.shards.config:ShardsConfig"),
    Stage("pretrain", "pretrain an autoencoder (MAE, NIM, DMAE, MIMIR) with DeepSpeed",
          "robustmim pretrain --config configs/pretrain/dmae_tiny_fmnist.yaml --nproc-per-node 2 "
          "out_dir=runs/demo/pretrain_dmae data.shards=runs/demo/shards",
          Launch.training, *TRAINING_ARGUMENTS, config="robustmim.pipeline.pretrain.config:PretrainConfig",
          train="robustmim.pipeline.pretrain.task:pretrain",
          export="robustmim.pipeline.pretrain.export:export_autoencoder"),
    Stage("finetune", "fine-tune a pretrained encoder into each defense's classifier (standard, De3, DMAE, "
                      "MIMIR, DAT)",
          "robustmim finetune --config configs/finetune/dmae_tiny_fmnist.yaml --nproc-per-node 2 "
          "out_dir=runs/demo/finetune_dmae init=runs/demo/dmae_tiny.safetensors",
          Launch.training, *TRAINING_ARGUMENTS, config="robustmim.pipeline.finetune.config:FinetuneConfig",
          train="robustmim.pipeline.finetune.task:finetune",
          export="robustmim.pipeline.finetune.export:export_classifier"),
    Stage("tokenizer", "train a VQGAN tokenizer on the shards (the discretizer of DAT fine-tuning)",
          "robustmim tokenizer --config configs/tokenizer/tiny_fmnist.yaml --nproc-per-node 2 "
          "out_dir=runs/demo/tokenizer",
          Launch.training, *TRAINING_ARGUMENTS, config="robustmim.pipeline.tokenizer.config:TokenizerConfig",
          train="robustmim.pipeline.tokenizer.task:train_tokenizer",
          export="robustmim.pipeline.tokenizer.export:export_tokenizer"),
    Stage("export", "consolidate a checkpoint into safetensors: an autoencoder, a tokenizer, or a classifier with "
                    "its deployment JSON",
          "robustmim export runs/demo/pretrain_dmae --out runs/demo/dmae_tiny.safetensors",
          Launch.local, "robustmim.pipeline.cli:add_export_arguments", "robustmim.pipeline.cli:run_export"),
    Stage("eval", "robustness of a classifier export: clean, PGD (EOT for randomized defenses), CERTIFY / PREDICT",
          "robustmim eval --config configs/eval/tiny_fmnist.yaml --nproc-per-node 2 certify.enabled=true "
          "--model runs/demo/classifiers/dmae_tiny.json --data runs/demo/shards --out runs/demo/eval/dmae",
          Launch.array, "robustmim.eval.cli:add_eval_arguments", "robustmim.eval.cli:run_eval_command",
          config="robustmim.eval.config:EvalConfig"),
    Stage("report", "one markdown table and PNG plots from several evaluations",
          "robustmim report runs/demo/eval/standard runs/demo/eval/dmae --out runs/demo/report",
          Launch.local, "robustmim.eval.cli:add_report_arguments", "robustmim.eval.cli:run_report"),
    Stage("study", "the papers' claims as paired comparisons of evaluations (exact McNemar tests, verdicts, plots)",
          "robustmim study --config configs/study/tiny_fmnist.yaml runs=runs/demo out=docs/results.md",
          Launch.local, "robustmim.eval.cli:add_study_arguments", "robustmim.eval.cli:run_study_command",
          config="robustmim.eval.study:StudyConfig"),
    Stage("submit", "send a stage to Slurm (or the local executor) through submitit",
          "robustmim submit pretrain --config configs/pretrain/mae_vitl_in1k.yaml --nodes 4 --gpus-per-node 8 "
          "--partition gpu data.shards=/data/in1k out_dir=/scratch/mae_l --dry-run",
          Launch.local, "robustmim.slurm.cli:add_submit_arguments", "robustmim.slurm.cli:run_submit"),
    Stage("status", "show a run's jobs, last step and checkpoint", "robustmim status /scratch/mae_l",
          Launch.local, "robustmim.slurm.cli:add_status_arguments", "robustmim.slurm.cli:run_status"),
    Stage("check", "a distributed all-reduce smoke test of a Slurm allocation",
          "robustmim submit check --out-dir /scratch/check --nodes 2 --gpus-per-node 8", Launch.check),
)


def stage_named(name: str, stages: tuple[Stage, ...] = STAGES) -> Stage:
    for stage in stages:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; the stages are: {', '.join(s.name for s in stages)}")


def training_stages(stages: tuple[Stage, ...] = STAGES) -> dict[str, Stage]:
    return {s.name: s for s in stages if s.launch is Launch.training}


def submittable(stages: tuple[Stage, ...] = STAGES) -> list[str]:
    """What `robustmim submit` sends: training runs, array jobs and the allocation check."""
    return [s.name for s in stages if s.launch is not Launch.local]


def commands(stages: tuple[Stage, ...] = STAGES) -> list[Stage]:
    """The stages with a command of their own (`robustmim <name>`)."""
    return [s for s in stages if s.add_arguments and s.run]

"""Submitting a stage with submitit: executor settings, a pre-flight check, dry runs.

Before anything is queued: the time format is checked, and on Slurm the exact batch script
submitit would submit goes through `sbatch --test-only`, so Slurm itself rejects an unknown
partition, account or QOS, or more nodes, tasks or CPUs than the cluster has, with its own
message. Logs of every task land under <out_dir>/slurm/<job id>/.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import submitit

from robustmim.errors import UserError
from robustmim.slurm.config import ClusterKind, SlurmConfig, time_minutes
from robustmim.slurm.job import StageJob
from robustmim.slurm.jobs import record_submission


def resolve_cluster(kind: ClusterKind) -> str:
    if kind is ClusterKind.auto:
        return "slurm" if shutil.which("sbatch") else "local"
    if kind is ClusterKind.slurm and not shutil.which("sbatch"):
        raise UserError("cluster=slurm, but there is no `sbatch` on this machine")
    return kind.value


def make_executor(cfg: SlurmConfig, out_dir: Path) -> tuple[submitit.AutoExecutor, str]:
    cluster = resolve_cluster(cfg.cluster)
    executor = submitit.AutoExecutor(folder=str(out_dir / "slurm" / "%j"), cluster=cluster,
                                     slurm_max_num_timeout=cfg.max_requeues)
    params = dict(name=cfg.job_name, nodes=cfg.nodes, tasks_per_node=cfg.gpus_per_node or cfg.tasks_per_node,
                  cpus_per_task=cfg.cpus_per_task, timeout_min=time_minutes(cfg.time))
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.mem_gb:
        params["mem_gb"] = cfg.mem_gb
    if cluster == "slurm":
        params["slurm_signal_delay_s"] = cfg.signal_delay_s
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(cfg, key):
                params[f"slurm_{key}"] = getattr(cfg, key)
        if cfg.exclusive:
            params["slurm_exclusive"] = True
    executor.update_parameters(**params)
    return executor, cluster


def sbatch_script(executor: submitit.AutoExecutor) -> str:
    """The batch script submitit writes for a job (its own private helper; submitit is pinned)."""
    return executor._executor._make_submission_file_text(executor._executor._submitit_command_str, "dry-run")


def preflight(executor: submitit.AutoExecutor) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as script:
        script.write(sbatch_script(executor))
        script.flush()
        result = subprocess.run(["sbatch", "--test-only", script.name], capture_output=True, text=True, timeout=60)
    # --test-only reports on stderr even when the job would run ("... to start at ...")
    if result.returncode != 0:
        raise UserError("Slurm rejects this job: " + (result.stderr.strip() or result.stdout.strip()))


@dataclass
class MemoryEstimate:
    params: int
    model_states_gb: float  # weights + gradients + Adam moments (+ fp32 masters), as partitioned by ZeRO
    activations_gb: float | None = None  # saved for backward by one micro-batch (None: not estimated)
    micro_batch: int = 0
    half_precision: bool = True
    bf16_weights: bool = False  # DeepSpeed's bf16 mode: bf16 weights and gradients, fp32 masters

    @property
    def total_gb(self) -> float:
        return self.model_states_gb + (self.activations_gb or 0.0)

    def describe(self) -> str:
        held = ("bf16 weights and gradients, fp32 master weights and Adam moments" if self.bf16_weights
                else "fp32 weights, gradients, Adam moments")
        states = f"{self.params / 1e6:.1f}M parameters; model states ~{self.model_states_gb:.2f} GB per GPU ({held})"
        if self.activations_gb is None:
            return states + "; activations and DALI buffers come on top"
        precision = "bf16" if self.half_precision else "fp32"
        return (f"{states} + activations ~{self.activations_gb:.1f} GB (micro-batch {self.micro_batch}, "
                f"{precision}) = ~{self.total_gb:.1f} GB per GPU, DALI buffers and the allocator's slack on top")


# Bytes saved for backward per token and block of a pre-norm ViT block, per unit of width, with
# fused (flash / memory-efficient) attention, which saves no score matrix: Korthikanti et al.'s
# 34 * width bytes per token in 16-bit (their 5 * heads * tokens term is the score matrix).
# Under bf16 autocast the layer norms keep fp32 outputs; 40 covers them. fp32 doubles it.
ACTIVATION_BYTES_PER_TOKEN_WIDTH = {True: 40, False: 80}


def block_tokens(cfg) -> list[tuple[int, int]]:
    """(tokens, width) of each transformer block one image passes through in training."""
    from robustmim.pipeline.models.config import ClassifierConfig, ModelConfig

    model = cfg.model
    if isinstance(model, ClassifierConfig):
        return [(model.num_patches + 1, model.embed_dim)] * model.depth
    if not isinstance(model, ModelConfig):
        return []
    objective = cfg.objective
    mask_ratio = getattr(objective, objective.name.value).mask_ratio
    visible = int(model.num_patches * (1 - mask_ratio)) + 1
    width, depth, _ = model.decoder_dims
    return [(visible, model.embed_dim)] * model.depth + [(model.num_patches + 1, width)] * depth


def estimate_memory(cfg, world_size: int, on_gpu: bool = True) -> MemoryEstimate:
    """Trained parameters: the autoencoder (ModelConfig), the classifier (ClassifierConfig,
    1000 classes where the count comes from the manifest; frozen denoisers and tokenizers not
    counted) or the tokenizer (VQGANConfig; its optional discriminator not counted). Activations:
    the transformer blocks of one micro-batch (`block_tokens`; not estimated for the VQGAN)."""
    import dataclasses

    import torch

    from robustmim.pipeline.engine.config import Precision, uses_bf16
    from robustmim.pipeline.models.classifier import ViTClassifier
    from robustmim.pipeline.models.config import ClassifierConfig, VQGANConfig
    from robustmim.pipeline.models.mae import MaskedAutoencoder
    from robustmim.pipeline.models.vqgan import VQGAN

    model_cfg = cfg.model
    with torch.device("meta"):
        if isinstance(model_cfg, VQGANConfig):
            model = VQGAN(model_cfg)
        elif isinstance(model_cfg, ClassifierConfig):
            model = ViTClassifier(dataclasses.replace(model_cfg, num_classes=model_cfg.num_classes or 1000))
        else:
            model = MaskedAutoencoder(model_cfg)
        params = sum(p.numel() for p in model.parameters())
    weights, grads, adam = 4 * params, 4 * params, 8 * params  # fp32 weights and gradients, Adam's two moments
    if cfg.precision is Precision.bf16_weights:  # bf16 weights and gradients; fp32 masters beside Adam's moments
        weights, grads, adam = 2 * params, 2 * params, 12 * params
    shared = {0: (weights + grads + adam, 0), 1: (weights + grads, adam), 2: (weights, grads + adam),
              3: (0, weights + grads + adam)}[cfg.zero_stage]
    half = uses_bf16(cfg.precision, on_gpu)
    if cfg.precision is not Precision.bf16_weights:
        # Over fp32 weights, DeepSpeed's ZeRO optimizer keeps its own fp32 copy of the partition it
        # updates and a flat fp32 gradient partition (8 bytes, sharded), and autocast saves a bf16
        # copy of every weight for backward (2 bytes, every rank). With these the ViT-L estimates
        # came within 15% of the peaks measured on one H200 (docs/benchmarks.md; tests/test_benches.py).
        shared = (shared[0] + (2 * params if half else 0), shared[1] + (8 * params if cfg.zero_stage else 0))
    blocks = block_tokens(cfg)
    activations = None
    if blocks and not cfg.activation_checkpointing:
        per_image = sum(tokens * width for tokens, width in blocks) * ACTIVATION_BYTES_PER_TOKEN_WIDTH[half]
        activations = per_image * cfg.micro_batch / 1e9
    return MemoryEstimate(params, (shared[0] + shared[1] / world_size) / 1e9, activations, cfg.micro_batch, half,
                          cfg.precision is Precision.bf16_weights)


def submit_array(function, items: list, cfg: SlurmConfig, out_dir: Path, stage: str = "array") -> list[str]:
    """One array task per item (e.g. one per evaluation shard); returns the tasks' job ids."""
    executor, cluster = make_executor(cfg, out_dir)
    if cluster == "slurm":
        preflight(executor)
    jobs = executor.map_array(function, items)
    for job in jobs:
        record_submission(out_dir, {"job_id": job.job_id, "stage": stage, "cluster": cluster, "tasks": cfg.tasks,
                                    "logs": str(out_dir / "slurm" / job.job_id.split("_")[0])})
    return [job.job_id for job in jobs]


def submit(stage: str, out_dir: Path, config_path: str | None, overrides: list[str], cfg: SlurmConfig,
           dry_run: bool, describe: str = "") -> str | None:
    executor, cluster = make_executor(cfg, out_dir)
    if dry_run:
        if cluster == "slurm":
            print(sbatch_script(executor))
        else:
            print(f"# local executor: {cfg.tasks} process(es) on this machine, no batch script")
        print(f"# world size: {cfg.tasks} ({cfg.nodes} node(s) x {cfg.gpus_per_node or cfg.tasks_per_node} task(s))")
        if describe:
            print(describe)
        return None
    if cluster == "slurm":
        preflight(executor)
    job = executor.submit(StageJob(stage, str(out_dir), config_path, overrides, cfg.max_requeues))
    record_submission(out_dir, {"job_id": job.job_id, "stage": stage, "cluster": cluster, "tasks": cfg.tasks,
                                "logs": str(out_dir / "slurm" / job.job_id), "config": config_path,
                                "overrides": overrides})
    return job.job_id

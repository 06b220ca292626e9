"""Engine configuration shared by every training stage (data, optimizer, length, batch, ZeRO,
precision, checkpoints, logging); each stage's config adds its own sections to it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from omegaconf import MISSING

from robustmim.pipeline.data.accounting import RunLength
from robustmim.pipeline.data.config import LoaderConfig
from robustmim.pipeline.flops import PEAK_TFLOPS_DENSE_BF16


class Precision(enum.Enum):
    auto = "auto"  # bf16 autocast on GPU, fp32 on CPU (bf16 is 14-23x slower on CPUs without it)
    fp32 = "fp32"
    bf16 = "bf16"  # fp32 weights, matmuls under bf16 autocast (weights re-cast to bf16 every forward)
    # bf16 autocast where the hardware computes bf16: GPUs, and CPUs with AMX-BF16 or AVX512-BF16
    # (x86) or BF16 (ARM) instructions; fp32 on other CPUs, where bf16 is emulated. For
    # convolutional networks (the VQGAN tokenizer) on such a CPU: 1.7-2x faster than fp32, where
    # the tiny ViTs' small matmuls are 10-25% slower.
    bf16_native = "bf16_native"
    # Training only: DeepSpeed's bf16 mode, bf16 weights and gradients with fp32 master weights in
    # the (ZeRO-sharded) optimizer, under the same autocast, so norms, losses and noise stay fp32.
    # No per-forward weight cast; exports read the fp32 masters. Needs zero_stage >= 1.
    bf16_weights = "bf16_weights"


def uses_bf16(precision: Precision, on_gpu: bool) -> bool:
    """Whether the forward runs under bf16 autocast."""
    if precision is Precision.bf16_native:
        return on_gpu or cpu_computes_bf16()
    return precision in (Precision.bf16, Precision.bf16_weights) or (precision is Precision.auto and on_gpu)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (x86 AMX-BF16 or AVX512-BF16, ARM BF16 or SVE-BF16),
    as torch's runtime detection reports them; False where this torch cannot tell."""
    import torch  # here, not at the top: configs load without torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:
        return False
    found = capabilities()
    return any(found.get(name) for name in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16"))


def compiles(setting: bool | None, on_gpu: bool) -> bool:
    """Whether the transformer blocks are compiled: `compile: null` (auto) means on a GPU, where
    compiled blocks measured faster (MAE-L through the engine on one H200: 2,616 against 2,065
    images/s eager; PGD and certification likewise, docs/benchmarks.md), and off on CPU, where
    compiling costs more than a short run gains."""
    return on_gpu if setting is None else setting


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256 (MAE)
    min_lr: float = 0.0  # where the cosine ends
    weight_decay: float = 0.05  # none on norms, biases, position embeddings and tokens
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's (beta1, beta2)
    warmup_epochs: float = 40.0  # linear, per step; then half-cycle cosine to min_lr
    clip_grad: float = 0.0  # max gradient norm; 0 disables

    def __post_init__(self) -> None:
        if self.base_lr <= 0:
            raise ValueError(f"optim.base_lr must be positive, got {self.base_lr}")
        if self.min_lr < 0 or self.weight_decay < 0 or self.warmup_epochs < 0 or self.clip_grad < 0:
            raise ValueError("optim.min_lr, weight_decay, warmup_epochs and clip_grad must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {list(self.betas)}")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # also on SIGTERM / SIGUSR1 and at the end
    keep_last: int = 3  # checkpoints kept (older ones go once a newer one is complete)
    # latest: continue from <out_dir>/checkpoints/latest when there is one (what a requeued job
    # does); none: start at step 0, refused when out_dir already holds checkpoints (nothing is
    # overwritten); or a step_* directory (any run's): start from it when out_dir holds none of
    # its own, else continue from out_dir's latest (a requeue of that run).
    resume: str = "latest"
    # Resuming a checkpoint saved under other optim, data, seed, batch or model settings is
    # refused, naming them; true continues anyway (e.g. a moved shard directory).
    allow_config_change: bool = False

    def __post_init__(self) -> None:
        if self.every_steps <= 0 or self.keep_last <= 0:
            raise ValueError("checkpoint.every_steps and checkpoint.keep_last must be positive")
        if self.resume in ("", "true", "false", "True", "False"):
            raise ValueError(f"checkpoint.resume must be latest, none or a step_* checkpoint directory, "
                             f"got {self.resume!r}")


@dataclass
class ValidationConfig:
    split: str = "val"  # read with the evaluation transform
    every_steps: int = 1000  # and at the end; 0 disables validation
    batch_size: int = 256  # per rank
    every_nth: int = 1  # validate on samples 0, n, 2n, ... of the split (the same set for any rank count)

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.batch_size <= 0 or self.every_nth <= 0:
            raise ValueError("validation.every_steps must be >= 0, batch_size and every_nth positive")


class WandbMode(enum.Enum):
    online = "online"
    offline = "offline"


@dataclass
class LoggingConfig:
    """Where rank 0's metrics go besides <out_dir>/metrics.jsonl and <out_dir>/tensorboard/."""

    # Also to Weights & Biases (`pip install wandb`): one W&B run per out_dir, its id kept in every
    # checkpoint, so a requeued or re-run job continues the same W&B run.
    wandb: bool = False
    wandb_project: str = "robustmim"  # the W&B project the run goes to
    wandb_entity: str = ""  # the W&B team or user; empty: the logged-in account's default
    # online needs `wandb login` or WANDB_API_KEY; offline writes <out_dir>/wandb/ for a later
    # `wandb sync` (compute nodes without network). A WANDB_MODE environment variable wins.
    wandb_mode: WandbMode = WandbMode.online


@dataclass
class EngineConfig:
    """What the training engine needs from any stage's config."""

    # Sections whose change makes a checkpoint a different run (reported on resume).
    hashed_sections: ClassVar[tuple[str, ...]] = ("optim", "data", "seed", "global_batch", "micro_batch")
    renamed_keys: ClassVar[dict[str, str]] = {"run_dir": "out_dir"}  # one output-directory name across stages

    out_dir: str = MISSING  # checkpoints, metrics.jsonl, tensorboard/, config.yaml; a re-run resumes it
    seed: int = 0  # initial weights and every per-step draw (masks, noise, attacks)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    length: RunLength = field(default_factory=lambda: RunLength(epochs=800))
    global_batch: int = 4096  # images per optimizer step, all ranks together
    micro_batch: int = 64  # per rank and step; accumulation = global / (micro * ranks)
    # ZeRO-1 shards the optimizer state (12 of the 16 bytes per parameter), which is what
    # matters for models of this size; ZeRO-2 also shards gradients but reduces them on every
    # micro-step; ZeRO-3 shards the weights too (for models that do not fit otherwise).
    zero_stage: int = 2
    zero_bucket_size: int = 50_000_000  # ZeRO-2 reduce / all-gather bucket (elements)
    precision: Precision = Precision.auto  # auto, fp32, bf16 (autocast) or bf16_weights (DeepSpeed's bf16 mode)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)
    # torch.compile each transformer block: null (auto) on GPU, off on CPU and with ZeRO-3, whose
    # parameter hooks inside each block would break the graphs (true is refused there).
    compile: Optional[bool] = None
    log_every: int = 20  # steps between logs, metric reads and signal checks
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Per device, the MFU denominator: the H100/H200 dense bf16 spec, as every bench uses.
    peak_tflops: float = PEAK_TFLOPS_DENSE_BF16
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.global_batch <= 0 or self.micro_batch <= 0 or self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch ({self.global_batch}) must be a positive multiple of "
                             f"micro_batch ({self.micro_batch})")
        if self.precision is Precision.bf16_weights and self.zero_stage == 0:
            raise ValueError("precision=bf16_weights needs zero_stage >= 1: its fp32 master weights live in the "
                             "ZeRO optimizer's checkpoint, where `robustmim export` reads them")
        if self.compile and self.zero_stage == 3:
            raise ValueError("compile=true needs zero_stage <= 2 (ZeRO-3 gathers parameters in hooks inside each "
                             "block)")
        if self.log_every <= 0 or self.peak_tflops <= 0 or self.zero_bucket_size <= 0:
            raise ValueError("log_every, peak_tflops and zero_bucket_size must be positive")

    def compiles(self, on_gpu: bool) -> bool:
        """Whether this run compiles its blocks (`compile: null` resolved for the device)."""
        return compiles(self.compile, on_gpu and self.zero_stage != 3)

    def check_model_input(self, model_size: int, model_channels: int) -> None:
        """The loader's images must be what the ViT takes (found here, not minutes into timm)."""
        if self.data.image_size != model_size:
            raise ValueError(f"data.image_size {self.data.image_size} differs from model.img_size {model_size}: "
                             f"set both to the same size")
        if self.data.channels != model_channels:
            raise ValueError(f"data.channels {self.data.channels} differs from model.in_chans {model_channels}")

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank; an error if the batch does not split."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ValueError(f"global_batch {self.global_batch} is not divisible by {world_size} ranks x "
                             f"micro_batch {self.micro_batch} = {per_step}")
        return self.global_batch // per_step

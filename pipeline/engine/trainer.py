"""The training loop of every stage: DeepSpeed ZeRO over a task's module, fed by DALI.

A task (pipeline/engine/task.py) supplies the module, its parameter groups and its
validation; pretraining and fine-tuning are tasks. Per optimizer step each rank runs
`accumulation` micro-batches; DeepSpeed reduces gradients and steps the optimizer and the lr
schedule on the boundary. Every draw (masks, noise, attack starts) comes from a generator seeded
by (seed, micro-step, rank) and the loader resumes at its exact position, so a resumed run
repeats an uninterrupted one. The loop reads values from the
device only at log intervals: one all-reduce carries the interval's loss and the stop flag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from omegaconf import OmegaConf

from robustmim.config import to_yaml
from robustmim.errors import UserError
from robustmim.provenance import write_provenance
from robustmim.runlock import DirectoryLock
from robustmim.log import get_logger
from robustmim.pipeline.data.dali import DaliLoader, use_gpu
from robustmim.pipeline.data.shardset import open_shards
from robustmim.pipeline.dist import broadcast_object, detect_env, init_distributed, shutdown_distributed
from robustmim.pipeline.engine.checkpoint import Checkpointer, ResumePoint
from robustmim.pipeline.engine.config import EngineConfig, Precision, uses_bf16
from robustmim.pipeline.engine.metrics import MetricsLog, scalar_sinks
from robustmim.pipeline.engine.optim import build_optimizer
from robustmim.pipeline.engine.run_state import write_run_state
from robustmim.pipeline.engine.signals import StopRequest
from robustmim.pipeline.engine.task import TrainingTask
from robustmim.pipeline.models.vit import compile_blocks
from robustmim.pipeline.randomness import step_generator

log = get_logger(__name__)


# 2: a section's performance-only settings (LoaderConfig.performance_only) are left out of its
# hash. Checkpoints of version 1 hashed them into `data`, which is then not compared.
CONFIG_HASHES_VERSION = 2


def config_hashes(cfg: EngineConfig) -> dict[str, str]:
    """One digest per section whose change makes a checkpoint another run's (`hashed_sections`)."""
    def digest(value) -> str:
        if dataclasses.is_dataclass(value) and getattr(value, "performance_only", ()):
            tree = OmegaConf.to_container(OmegaConf.structured(value), enum_to_str=True)
            text = json.dumps({k: v for k, v in tree.items() if k not in value.performance_only}, sort_keys=True)
        else:  # as version 1 hashed them, so those digests stay comparable
            text = to_yaml(value) if dataclasses.is_dataclass(value) else repr(value)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return {name: digest(getattr(cfg, name)) for name in cfg.hashed_sections}


def changed_sections(saved: dict, version: int | None, current: dict[str, str]) -> list[str]:
    """The hashed sections a checkpoint was saved under other settings of (those it recorded)."""
    comparable = {k: v for k, v in current.items() if version == CONFIG_HASHES_VERSION or k != "data"}
    return sorted(k for k, v in comparable.items() if k in saved and saved[k] != v)


def deepspeed_config(cfg: EngineConfig, accumulation: int, bf16: bool, universal: bool) -> dict:
    zero = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2):
        # Without clipping nothing needs the global gradient norm: skip its all-reduce and host read.
        zero.update(contiguous_gradients=True, compute_grad_norm=bool(cfg.optim.clip_grad))
    if cfg.zero_stage == 2:
        # Gradients are reduced while the backward runs, bucket by bucket; a bucket larger than
        # the model (DeepSpeed's default 5e8 elements; a ViT-L has 3.3e8) would leave nothing to
        # overlap.
        zero.update(overlap_comm=True, reduce_bucket_size=cfg.zero_bucket_size,
                    allgather_bucket_size=cfg.zero_bucket_size)
    if cfg.zero_stage == 3:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    config = {"train_batch_size": cfg.global_batch, "train_micro_batch_size_per_gpu": cfg.micro_batch,
              "gradient_accumulation_steps": accumulation, "zero_optimization": zero,
              "steps_per_print": 2**31 - 1}
    # Always stated: DeepSpeed's own default is 1.0, which would clip every run that asks for none.
    config["gradient_clipping"] = cfg.optim.clip_grad
    if bf16:  # matmuls in bf16; norms, losses and noise arithmetic stay fp32
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if cfg.precision is Precision.bf16_weights:  # bf16 weights and gradients, fp32 masters in the optimizer
        config["bf16"] = {"enabled": True}
    if universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def train(cfg: EngineConfig, task_class: type[TrainingTask]) -> dict:
    env = detect_env()
    on_gpu = use_gpu(cfg.data.device)
    if on_gpu:  # fp32 matmuls outside autocast (fp32 runs, the optimizer's) may use TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    init_distributed(env, on_gpu)
    try:
        trainer = Trainer(cfg, task_class, env, on_gpu)
        try:
            return trainer.run()
        finally:
            trainer.lock.release()
    finally:
        shutdown_distributed()


class LossTerms:
    """Device-side sums of the scalar terms a task's forward returns beside its loss (reconstruction,
    penalties, GAN terms, ...), logged as interval means. The names are fixed by the first
    micro-batch, the same on every rank (they depend on the config only), so the sums travel in
    the interval's one all-reduce."""

    RESERVED = ("step", "samples", "epoch", "loss", "lr", "images_per_s", "mfu", "data_wait")

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] | None = None
        self.sums = torch.zeros(0, device=device, dtype=torch.float64)

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        if self.names is None:
            self.names = sorted(name for name in metrics if name not in self.RESERVED)
            self.sums = torch.zeros(len(self.names), device=self.device, dtype=torch.float64)
        if self.names:
            self.sums += torch.stack([metrics[name].detach().to(torch.float64).reshape(()) for name in self.names])


class Trainer:
    def __init__(self, cfg: EngineConfig, task_class: type[TrainingTask], env, on_gpu: bool, loader_class=DaliLoader):
        """`loader_class` builds the training stream (DaliLoader's signature and state_dict);
        benches pass one of synthetic device batches to time the engine where DALI is absent."""
        self.loader_class = loader_class
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.env = env
        self.device = torch.device("cuda", env.local_rank) if on_gpu else torch.device("cpu")
        try:
            self.accumulation = cfg.accumulation(env.world_size)
        except ValueError as e:
            raise UserError(str(e)) from None
        shards = open_shards(cfg.data.shards, cfg.data.split, cfg.data.verify_hashes)  # before any work
        self.cfg = cfg = task_class.resolve(cfg, shards)
        self.task = task = task_class(cfg, env, self.device)  # its own files (a denoiser, a tokenizer) load here
        self.split_size = shards.total
        self.total_steps = cfg.length.steps(shards.total, cfg.global_batch)
        warmup_steps = round(cfg.optim.warmup_epochs * shards.total / cfg.global_batch)
        self.out_dir = Path(cfg.out_dir)
        self.lock = DirectoryLock(self.out_dir, f"robustmim {task.stage}")
        refusal = None
        if env.is_main:  # one writer per run directory, held until this run ends
            try:
                self.lock.acquire()
                write_provenance(self.out_dir, cfg, task.stage)
            except UserError as e:
                refusal = e
        refusal = broadcast_object(refusal)
        if refusal is not None:
            raise refusal

        self.checkpointer = Checkpointer(self.out_dir, cfg.checkpoint.keep_last, env.rank, env.world_size, task.stage)
        resume = self.checkpointer.resume_point(cfg.checkpoint.resume)
        # One id per run, kept in every checkpoint: a requeued or re-run job carries it on (its W&B
        # run continues); a branch from another run's checkpoint is a run of its own.
        continues = resume is not None and resume.source is None and resume.run_id  # the same on every rank
        self.run_id = resume.run_id if continues else broadcast_object(uuid.uuid4().hex[:12] if env.is_main else None)
        self.hashes = config_hashes(cfg)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        module = task.build().to(self.device)
        if cfg.compiles(on_gpu):
            compile_blocks(module)
        groups = task.param_groups(module)
        optimizer, scheduler = build_optimizer(groups, cfg.optim, cfg.global_batch, warmup_steps, self.total_steps)
        self.first_group_scale = groups[0]["lr_scale"]  # logs show the peak (scale 1) lr
        self.bf16 = bf16 = uses_bf16(cfg.precision, on_gpu)
        # DeepSpeed prints (not logs) that it built its CPU shared-memory collective on every rank:
        # kept at debug level, out of the console.
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            self.engine, _, _, _ = deepspeed.initialize(
                model=module, optimizer=optimizer,
                lr_scheduler=scheduler,
                config=deepspeed_config(cfg, self.accumulation, bf16, bool(resume and resume.elastic)),
                dist_init_required=False)
        for line in printed.getvalue().splitlines():
            log.debug(f"deepspeed: {line}")
        self.step, self.samples_seen = 0, 0
        self.last_validation: dict = {}
        self.loader = self._restore(resume) if resume else self._loader(cfg.data.seed, None)
        self.flops_per_image = task.flops_per_image()

    def _loader(self, seed: int, state) -> DaliLoader:
        data = dataclasses.replace(self.cfg.data, batch_size=self.cfg.micro_batch, seed=seed)
        return self.loader_class(data, self.env.rank, self.env.world_size, self.env.local_rank, train=True, state=state)

    def _restore(self, point: ResumePoint) -> DaliLoader:
        client = self.checkpointer.load(self.engine, point)
        self.step, self.samples_seen = point.step, point.samples_seen
        changed = changed_sections(client.get("config_hashes", {}), client.get("config_hashes_version"), self.hashes)
        if changed and not self.cfg.checkpoint.allow_config_change:  # the same on every rank: all stop
            raise UserError(f"{self.checkpointer.source_of(point) / point.tag} was saved under other settings of: "
                            f"{', '.join(changed)}; resume it anyway with checkpoint.allow_config_change=true, or "
                            f"start a new out_dir")
        if changed:
            log.info(f"note: resuming {point.tag} with changed config section(s): {', '.join(changed)}")
        if point.elastic:  # a new world size: a fresh, deterministic stream (see checkpoint.py)
            return self._loader(self.cfg.data.seed + 1_000_003 * point.step, None)
        mine = client["ranks"][self.env.rank]
        torch.set_rng_state(mine["torch_rng"])
        if self.device.type == "cuda" and mine.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        return self._loader(self.cfg.data.seed, mine["loader"])

    def _client_state(self) -> dict:
        mine = {"loader": self.loader.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        ranks = [None] * self.env.world_size
        dist.all_gather_object(ranks, mine)
        return {"step": self.step, "samples_seen": self.samples_seen, "config_hashes": self.hashes,
                "config_hashes_version": CONFIG_HASHES_VERSION, "ranks": ranks}

    def save(self) -> str:
        return self.checkpointer.save(self.engine, self.step, self.samples_seen, self.hashes["model"],
                                      self._client_state(), self.run_id)

    def _validation_due(self) -> bool:
        every = self.task.validate_every
        return bool(every) and (self.step % every == 0 or self.step == self.total_steps)

    def _validate(self, log: MetricsLog) -> None:
        self.engine.module.eval()
        # under the training step's precision: what is validated is what is trained
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            metrics = self.task.validate(self.engine.module, self.step)
        self.engine.module.train()
        if metrics:
            log.log({"step": self.step, **metrics})
            self.last_validation = {"step": self.step, **metrics}

    def run(self) -> dict:
        cfg, env = self.cfg, self.env
        log = MetricsLog(self.out_dir, env.is_main, self.step, self.total_steps, self.task.stage,
                         lambda: scalar_sinks(cfg, self.out_dir, self.step, self.task.stage, self.run_id))
        stop = StopRequest()
        saved_at, stopped_by = self.step if self.step else None, None
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        terms = LossTerms(self.device)
        interval_steps, data_wait, interval_start = 0, 0.0, time.perf_counter()
        try:
            while self.step < self.total_steps:
                for micro in range(self.accumulation):
                    waited = time.perf_counter()
                    batch = next(self.loader)
                    data_wait += time.perf_counter() - waited
                    generator = step_generator(cfg.seed, self.step * self.accumulation + micro, env.rank, self.device)
                    loss, metrics = self.engine(batch.images, batch.labels, generator)
                    self.engine.backward(loss)
                    self.engine.step()
                    loss_sum += loss.detach()
                    terms.add(metrics)
                self.step += 1
                self.samples_seen += cfg.global_batch
                interval_steps += 1
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    # one collective and one host read per interval: [loss sum, stop flag, term sums]
                    packed = torch.cat([torch.stack([loss_sum, torch.tensor(1.0 if stop.signal_name else 0.0,
                                                                            device=self.device, dtype=torch.float64)]),
                                        terms.sums])
                    dist.all_reduce(packed)
                    loss_total, stop_votes, *term_totals = packed.tolist()
                    elapsed = time.perf_counter() - interval_start
                    rate = interval_steps * cfg.global_batch / elapsed
                    micro_batches = interval_steps * self.accumulation * env.world_size
                    log.log({"step": self.step, "samples": self.samples_seen,
                             "epoch": self.samples_seen / self.split_size, "loss": loss_total / micro_batches,
                             **{name: total / micro_batches for name, total in zip(terms.names, term_totals)},
                             "lr": self.engine.get_lr()[0] / self.first_group_scale, "images_per_s": rate,
                             "mfu": rate * self.flops_per_image / (cfg.peak_tflops * 1e12 * env.world_size),
                             "data_wait": data_wait / elapsed})
                    loss_sum.zero_()
                    terms.sums.zero_()
                    interval_steps, data_wait, interval_start = 0, 0.0, time.perf_counter()
                    if stop_votes > 0:
                        stopped_by = stop.signal_name or "a stop signal on another rank"
                        break
                if self._validation_due():
                    self._validate(log)
                if self.step % cfg.checkpoint.every_steps == 0:
                    self.save()
                    saved_at = self.step
            if saved_at != self.step:
                self.save()
            if stopped_by:
                log.note(f"stopped by {stopped_by} at step {self.step}; checkpoint saved, resume by re-running")
            if env.is_main:
                write_run_state(self.out_dir, "stopped" if stopped_by else "finished", self.step, self.total_steps,
                                stopped_by)
        finally:
            stop.restore()
            log.close()
        return {"step": self.step, "total_steps": self.total_steps, "samples_seen": self.samples_seen,
                "stopped_by": stopped_by, "checkpoint": self.checkpointer.latest_tag(),
                "validation": self.last_validation}

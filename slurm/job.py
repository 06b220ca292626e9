"""What runs in every task of a submitted job.

`StageJob` is the callable submitit pickles: in each task it maps submitit's job environment
(global rank, local rank, task count, the first node's hostname) onto the variables
`pipeline.dist.detect_env` reads, with the master port derived from the job id (the same
after a requeue), then runs the stage. It is checkpointable: on the time-limit warning
submitit asks it for a resubmission and requeues the job; the SIGTERM that ends the old run
makes the trainer write a checkpoint, and the requeued job resumes from `latest` by itself,
as it also does after `scontrol requeue` or a preemption, which never ask.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Optional

import submitit

from pipeline.dist import slurm_port

STAGES = ("pretrain", "check")


def allreduce_check() -> dict:
    """A distributed smoke test: every rank contributes rank + 1; all must see the same sum."""
    import torch
    import torch.distributed as dist

    from pipeline.dist import detect_env, init_distributed, shutdown_distributed

    env = detect_env()
    init_distributed(env, use_gpu=False)
    try:
        value = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(value)
        return {"rank": env.rank, "world_size": env.world_size, "sum": value.item(), "host": socket.gethostname()}
    finally:
        shutdown_distributed()


class StageJob(submitit.helpers.Checkpointable):
    def __init__(self, stage: str, run_dir: str, config_path: Optional[str], overrides: list[str]):
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}'; known: {STAGES}")
        self.stage, self.run_dir, self.config_path, self.overrides = stage, run_dir, config_path, list(overrides)

    def _export_dist_env(self) -> dict:
        import torch

        # One compute thread per allocated CPU, as torchrun does, instead of one per core of the
        # node: no oversubscription, and the same float summation order as a torchrun run.
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if threads and "OMP_NUM_THREADS" not in os.environ:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        env = submitit.JobEnvironment()
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                          MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(slurm_port(str(env.job_id))))
        return {"job_id": str(env.job_id), "rank": env.global_rank, "world_size": env.num_tasks,
                "restarts": int(os.environ.get("SLURM_RESTART_COUNT", 0))}

    def __call__(self):
        attempt = self._export_dist_env()
        if attempt["rank"] == 0:  # one line per (re)start: requeues are visible in `robustmim status`
            Path(self.run_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(self.run_dir) / "attempts.jsonl", "a") as f:
                f.write(json.dumps(attempt) + "\n")
        if self.stage == "check":
            return allreduce_check()
        from robustmim.config import load_config
        from pipeline.engine.config import PretrainConfig
        from pipeline.engine.trainer import train

        return train(load_config(PretrainConfig, self.config_path, self.overrides))

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self)

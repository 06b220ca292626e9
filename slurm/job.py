"""What runs in every task of a submitted job.

`StageJob` is the callable submitit pickles: in each task submitit's
`TorchDistributedEnvironment` exports the job's ranks (global rank, local rank, task count, the
first node's hostname, a master port fixed by the job id, so the same after a requeue) as the
variables `robustmim.pipeline.dist.detect_env` reads; then it runs the stage.

Time limits: the warning signal (SIGUSR2, `signal_delay_s` before the limit) stops the
trainer at its next log interval with a checkpoint; then rank 0 requeues the job with
`scontrol requeue` (each restart is logged in attempts.jsonl), and the requeued job resumes
from `latest` by itself, as after a preemption or an outside `scontrol requeue`. Should the
warning come before training started, submitit's own handler asks `checkpoint()` for a
resubmission and requeues: the job then resumes the same way. One counter limits both paths:
Slurm's SLURM_RESTART_COUNT (every requeue, preemptions included) against `max_requeues`.
(submitit keeps a count of the time-outs it handled itself, given the same limit; as each of
those is also a Slurm requeue, it never reaches the limit first.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Optional

import submitit

from robustmim.log import quiet_libraries, setup_logging
from robustmim.stages import Launch, resolve, stage_named, submittable

# what one (requeueing) job runs: training stages and the allocation check; array stages have their own task
STAGES = tuple(name for name in submittable() if stage_named(name).launch in (Launch.training, Launch.check))


def allreduce_check() -> dict:
    """A distributed smoke test: every rank contributes rank + 1; all must see the same sum."""
    import torch
    import torch.distributed as dist

    from robustmim.pipeline.dist import detect_env, init_distributed, shutdown_distributed

    env = detect_env()
    init_distributed(env, use_gpu=False)
    try:
        value = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(value)
        return {"rank": env.rank, "world_size": env.world_size, "sum": value.item(), "host": socket.gethostname()}
    finally:
        shutdown_distributed()


ATTEMPTS_FILE = "attempts.jsonl"


def restarts() -> int:
    """How many times Slurm requeued this job (time limits and preemptions alike)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)


def append_attempt(out_dir: str | Path, record: dict) -> None:
    """One line per start of a job or array task ({"job_id", ...}); lines with an "event" key
    record what happened in an attempt (a requeue) and are not starts."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / ATTEMPTS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


class StageJob(submitit.helpers.Checkpointable):
    def __init__(self, stage: str, out_dir: str, config_path: Optional[str], overrides: list[str],
                 max_requeues: int = 20):
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}'; known: {STAGES}")
        self.stage, self.out_dir, self.config_path, self.overrides = stage, out_dir, config_path, list(overrides)
        self.max_requeues = max_requeues

    def _export_dist_env(self) -> dict:
        import torch

        # One compute thread per allocated CPU, as torchrun does, instead of one per core of the
        # node: no oversubscription, and the same float summation order as a torchrun run.
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if threads and "OMP_NUM_THREADS" not in os.environ:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        # Every GPU of the node stays visible: each rank selects its own by local rank (one
        # visible device per task would leave local rank 1 pointing at a device that is not there).
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return {"job_id": str(submitit.JobEnvironment().job_id), "rank": env.rank, "world_size": env.world_size,
                "restarts": restarts()}

    def _log(self, record: dict) -> None:
        append_attempt(self.out_dir, record)

    def __call__(self):
        attempt = self._export_dist_env()
        setup_logging(attempt["rank"])
        quiet_libraries()
        if attempt["rank"] == 0:  # one line per (re)start: requeues are visible in `robustmim status`
            self._log(attempt)
        stage = stage_named(self.stage)
        if stage.launch is Launch.check:
            return allreduce_check()
        from robustmim.config import load_config
        from robustmim.pipeline.engine.signals import TIME_LIMIT_WARNINGS

        config_class, train = resolve(stage.config), resolve(stage.train)
        result = train(load_config(config_class, self.config_path, self.overrides))
        if attempt["rank"] == 0 and result["stopped_by"] in TIME_LIMIT_WARNINGS and "SLURM_JOB_ID" in os.environ:
            self._requeue(attempt, result)
        return result

    def _requeue(self, attempt: dict, result: dict) -> None:
        if not self.may_requeue():
            self._log({**attempt, "event": f"time limit at step {result['step']}; not requeued "
                                           f"(max_requeues={self.max_requeues} reached)"})
            return
        self._log({**attempt, "event": f"time limit at step {result['step']}; checkpoint saved; requeued"})
        job_id = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        subprocess.run(["scontrol", "requeue", f"{job_id}_{task}" if task else job_id], check=False)

    def may_requeue(self) -> bool:
        return restarts() < self.max_requeues

    def checkpoint(self, *args, **kwargs) -> Optional[submitit.helpers.DelayedSubmission]:
        """submitit's path (the warning came before training started): a resubmission, or None
        (submitit then ends the job) once the job has been requeued max_requeues times."""
        return submitit.helpers.DelayedSubmission(self) if self.may_requeue() else None


class EvalTask:
    """One array task of `robustmim submit eval`: chunk `rank` of `world_size` of the evaluated
    samples (one per eval shard by default). Tasks share nothing while they run; a requeued or
    re-submitted task skips what its records already hold. Merge with `robustmim eval
    --merge-only` (or `robustmim report`, which merges when needed)."""

    def __init__(self, config_path: Optional[str], overrides: list[str], world_size: int):
        self.config_path, self.overrides, self.world_size = config_path, list(overrides), world_size

    def __call__(self, rank: int) -> dict:
        from robustmim.config import load_config
        from robustmim.eval.config import EvalConfig
        from robustmim.eval.runner import run_eval

        setup_logging(rank)
        quiet_libraries()

        threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if threads:
            import torch

            torch.set_num_threads(threads)
        cfg = load_config(EvalConfig, self.config_path, self.overrides)
        if "SLURM_JOB_ID" in os.environ:  # `robustmim status` counts each array task's starts
            job = submitit.JobEnvironment()
            append_attempt(cfg.out_dir, {"job_id": str(job.job_id), "rank": rank,
                                         "restarts": int(os.environ.get("SLURM_RESTART_COUNT", 0))})
        result = run_eval(cfg, rank, self.world_size)
        return {"rank": rank, "evaluated": result["evaluated"]}

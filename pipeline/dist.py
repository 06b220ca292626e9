"""Distributed initialization from any launcher: torchrun, Slurm (srun or submitit), or none.

`detect_env()` maps the launcher's variables to one `DistEnv`; `init_distributed(env)` starts
torch.distributed (gloo on CPU, NCCL on GPU) on top of it, with no ssh, pdsh or DeepSpeed
launcher. Under Slurm the master is the job's first node and the port is derived from the job
id, so every task of a job (and a requeued job, which keeps its id) agrees without talking.

torch is imported by the functions that start or use the process group only: a launching
command reads its environment with `detect_env` and starts its ranks without paying the ~1 s of
torch's import before each launch.
"""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
from dataclasses import dataclass

from robustmim.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def slurm_port(job_id: str) -> int:
    """A port in 20000-29999 fixed by the Slurm job id."""
    return 20000 + int("".join(c for c in job_id if c.isdigit()) or 0) % 10000


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodelist.split(",")[0].split("[")[0]


def detect_env(environ: dict | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or a launcher exporting the same
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job_id = env.get("SLURM_ARRAY_JOB_ID", env.get("SLURM_JOB_ID", "0"))
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                       env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                       int(env.get("MASTER_PORT") or slurm_port(job_id)), "slurm")
    # One process alone: any free port, so that two single-process runs on one machine do not
    # both try torch's default 29500.
    return DistEnv(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()), "single")


def init_distributed(env: DistEnv, use_gpu: bool, timeout_minutes: float = 30.0) -> None:
    """Start the default process group for `env` (a no-op if one is running)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if use_gpu:
        torch.cuda.set_device(env.local_rank)
    os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
                      RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    try:
        dist.init_process_group("nccl" if use_gpu else "gloo", rank=env.rank, world_size=env.world_size,
                                timeout=_dt.timedelta(minutes=timeout_minutes))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"cannot start the process group ({env.launcher}, rank {env.rank}/{env.world_size}, "
                        f"master {env.master_addr}:{env.master_port}): {e}") from None


def broadcast_object(value):
    """Rank 0's `value` on every rank (itself when not distributed). Errors found by rank 0 travel
    this way too, so every rank raises the same one instead of waiting in the next collective."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()

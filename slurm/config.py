"""Slurm job settings (`slurm.*` keys, or `robustmim submit` flags)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

_TIME = re.compile(r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)|(?P<mm>\d+):(?P<ss>\d+)|(?P<minutes>\d+))$")


def time_minutes(value: str) -> int:
    """Slurm's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) as whole minutes, rounded up."""
    match = _TIME.match(value.strip())
    if not match:
        raise ValueError(f"time '{value}' is not a Slurm time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)")
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    seconds = (g.get("days", 0) * 86400 + (g.get("dh", 0) + g.get("h", 0)) * 3600
               + (g.get("dm", 0) + g.get("m", 0) + g.get("mm", 0) + g.get("minutes", 0)) * 60
               + g.get("ds", 0) + g.get("s", 0) + g.get("ss", 0))
    if seconds <= 0:
        raise ValueError(f"time '{value}' must be positive")
    return -(-seconds // 60)


class ClusterKind(enum.Enum):
    auto = "auto"  # Slurm where `sbatch` exists, else the local executor
    slurm = "slurm"
    local = "local"  # submitit's local executor: the same job function, processes on this machine


@dataclass
class SlurmConfig:
    cluster: ClusterKind = ClusterKind.auto  # auto (Slurm where sbatch exists, else local), slurm or local
    nodes: int = 1  # nodes of the job
    gpus_per_node: int = 0  # one task per GPU; with 0, tasks_per_node CPU tasks
    tasks_per_node: int = 1  # CPU tasks (ranks) per node when gpus_per_node is 0
    cpus_per_task: int = 8  # CPU cores per task (loader threads, DALI)
    mem_gb: int = 0  # per node; 0 leaves it to the partition's default
    partition: str = ""  # Slurm partition; empty: the cluster's default
    account: str = ""  # Slurm account to charge; empty: yours by default
    qos: str = ""  # Slurm quality of service; empty: the default
    time: str = "72:00:00"  # the time limit per attempt (Slurm formats: minutes, HH:MM:SS, D-HH, ...)
    constraint: str = ""  # Slurm node features, e.g. h100
    exclusive: bool = False  # whole nodes for the job
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = 20  # time-limit requeues submitit may do (preemptions are Slurm's)
    job_name: str = "robustmim"  # the name squeue shows

    def __post_init__(self) -> None:
        time_minutes(self.time)
        if self.nodes <= 0 or self.gpus_per_node < 0 or self.tasks_per_node <= 0 or self.cpus_per_task <= 0:
            raise ValueError("slurm.nodes, tasks_per_node and cpus_per_task must be positive, gpus_per_node >= 0")
        if self.signal_delay_s < 0 or self.max_requeues < 0 or self.mem_gb < 0:
            raise ValueError("slurm.signal_delay_s, max_requeues and mem_gb must be >= 0")

    @property
    def tasks(self) -> int:
        return self.nodes * (self.gpus_per_node or self.tasks_per_node)

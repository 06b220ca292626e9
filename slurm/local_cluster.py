"""A real Slurm on this machine, on loopback: for the tests and for rehearsing a job.

    python -m robustmim.slurm.local_cluster start [--dir runs/slurm] [--nodes 2]   # prints `export SLURM_CONF=...`
    python -m robustmim.slurm.local_cluster status|stop [--dir runs/slurm]

Debian's slurm-wlm and munge (installed with apt when missing, as root, with services blocked
from starting on their own) run as root without systemd or cgroups: munged with a private key
and socket, slurmctld and one slurmd started under setsid, everything (config, state, spool,
logs, pid files) in one private directory. Start is idempotent: a cluster already up and idle
is reused. Stop signals the daemons by their pid files. Client commands (sbatch, squeue,
scontrol, and submitit through them) find this cluster through SLURM_CONF.

Settings that matter for tests: `cred_expire=10` (a requeued job restarts after ~10 s instead
of ~2 min), short scheduler intervals, `MinJobAge=3600` (finished jobs stay visible to
`scontrol show job`, which `robustmim.slurm.jobs` uses where there is no accounting database), and
`FirstJobId` from the clock (a wiped state directory would otherwise reuse ids and submitit
would read an old result).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from robustmim.errors import UserError

PACKAGES = ("slurm-wlm", "munge")
CONTROL_DAEMONS = ("slurmctld", "munged")  # stopped after the node daemons, in this order


def ensure_packages() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise UserError("Slurm is not installed: install Debian's slurm-wlm and munge (as root: "
                        "apt-get install --no-install-recommends slurm-wlm munge)")
    policy = Path("/usr/sbin/policy-rc.d")
    existed = policy.exists()
    if not existed:  # keep apt from starting the packages' own daemons
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], check=True, env=env)
    finally:
        if not existed:
            policy.unlink(missing_ok=True)


def _machine() -> dict[str, str]:
    """This machine's resources as slurmd reports them (`slurmd -C`)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def _node_lines(names: list[str], hostname: str, ports: list[int]) -> str:
    """One node per slurmd, all on loopback; several nodes share the machine's CPUs and memory."""
    machine = _machine()
    if len(names) == 1:
        keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
        resources = " ".join(f"{k}={machine[k]}" for k in keep if k in machine)
        return f"NodeName={names[0]} NodeAddr=127.0.0.1 Port={ports[0]} {resources} State=UNKNOWN"
    cpus = max(1, int(machine["CPUs"]) // len(names))
    memory = int(machine.get("RealMemory", 1024)) // len(names)
    return "\n".join(f"NodeName={name} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
                     f"RealMemory={memory} State=UNKNOWN" for name, port in zip(names, ports))


def _ensure_resolvable(names: list[str]) -> None:
    """Several nodes on one machine need names that resolve (submitit's master address is the
    first node's name): map them to loopback in /etc/hosts, once."""
    missing = []
    for name in names:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if not missing:
        return
    if os.geteuid() != 0:
        raise UserError(f"node names {missing} do not resolve: add '127.0.0.1 {' '.join(missing)}' to /etc/hosts")
    with open("/etc/hosts", "a") as hosts:
        hosts.write(f"127.0.0.1 {' '.join(missing)}  # robustmim local Slurm nodes\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # Slurm 22.05 binds on all interfaces, so look for a port free on all
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    directory: Path
    partition: str = "debug"
    nodes: int = 1  # several slurmd on this machine (Debian's slurmd supports -N <node>)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        self.hostname = socket.gethostname().split(".")[0]
        self.node_names = ([self.hostname] if self.nodes == 1
                           else [f"{self.hostname}n{i}" for i in range(1, self.nodes + 1)])

    @property
    def conf(self) -> Path:
        return self.directory / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.directory / "munge" / "munge.socket.2"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _pid_file(self, daemon: str) -> Path:
        return self.directory / f"{daemon}.pid"

    @property
    def daemons(self) -> list[str]:
        return [f"slurmd-{name}" for name in self.node_names] + list(CONTROL_DAEMONS)

    def _alive(self, daemon: str) -> bool:
        try:
            os.kill(int(self._pid_file(daemon).read_text().split()[0]), 0)
            return True
        except (OSError, ValueError):
            return False

    def _write_config(self) -> None:
        d = self.directory
        for sub in ("state", "spool", "munge", "logs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "munge").chmod(0o755)  # munged refuses a socket directory others cannot enter
        key = d / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        ctld_port, slurmd_ports = _free_port(), [_free_port() for _ in self.node_names]
        self.conf.write_text(f"""# written by slurm/local_cluster.py: a one-node cluster on loopback
ClusterName=robustmim-local
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={self._pid_file('slurmctld')}
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/logs/slurmctld.log
SlurmdLogFile={d}/logs/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=3600
KillWait=15
MessageTimeout=10
InactiveLimit=0
FirstJobId={int(time.time()) % 1_000_000 * 10 + 1}
{_node_lines(self.node_names, self.hostname, slurmd_ports)}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, daemon: str, *args: str) -> None:
        log = open(self.directory / "logs" / f"{daemon}.out", "ab")
        subprocess.Popen([daemon, *args], stdout=log, stderr=log, start_new_session=True, env=self.env())

    def node_state(self) -> str:
        """The nodes' common state ("idle", ...), "mixed-states" if they differ, "" if down."""
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env(),
                                timeout=30)
        states = set(result.stdout.split()) if result.returncode == 0 else set()
        return states.pop() if len(states) == 1 else ("mixed-states" if states else "")

    def start(self, timeout: float = 60.0) -> float:
        """Start (or reuse) the cluster; returns the seconds until its node was idle."""
        began = time.monotonic()
        ensure_packages()
        if all(self._alive(d) for d in self.daemons) and self.node_state() in ("idle", "mixed", "allocated"):
            return time.monotonic() - began
        if self.nodes > 1:
            _ensure_resolvable(self.node_names)
        self.stop()
        self._write_config()
        try:
            self._start_daemons(began, timeout)
        except BaseException:
            self.stop()  # nothing half-started stays behind
            raise
        return time.monotonic() - began

    def _start_daemons(self, began: float, timeout: float) -> None:
        self._spawn("munged", "--force", f"--key-file={self.directory / 'munge.key'}",
                    f"--socket={self.munge_socket}", f"--pid-file={self._pid_file('munged')}",
                    f"--log-file={self.directory / 'logs' / 'munged.log'}",
                    f"--seed-file={self.directory / 'munge' / 'munge.seed'}")
        self._wait(lambda: self.munge_socket.exists(), began, timeout, "munged")
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        for name in self.node_names:
            (self.directory / "spool" / name).mkdir(parents=True, exist_ok=True)
            self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", name)
        self._wait(lambda: self.node_state() == "idle", began, timeout, "the nodes to become idle")

    def _wait(self, ready, began: float, timeout: float, what: str) -> None:
        while not ready():
            if time.monotonic() - began > timeout:
                logs = self.directory / "logs"
                raise UserError(f"local Slurm: timed out waiting for {what}; see the logs in {logs}")
            time.sleep(0.1)

    def stop(self) -> None:
        for daemon in self.daemons:
            pid_file = self._pid_file(daemon)
            if not pid_file.exists():
                continue
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.05)
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
            pid_file.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="a local Slurm cluster on loopback")
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", default="runs/slurm", help="private directory for config, state and logs")
    parser.add_argument("--nodes", type=int, default=1, help="slurmd daemons (nodes) on this machine")
    args = parser.parse_args()
    cluster = LocalCluster(Path(args.dir), nodes=args.nodes)
    if args.action == "start":
        seconds = cluster.start()
        print(f"local Slurm up in {seconds:.1f} s; use it with:\nexport SLURM_CONF={cluster.conf}")
    elif args.action == "stop":
        cluster.stop()
        print("local Slurm stopped")
    else:
        print(f"node: {cluster.node_state() or 'down'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

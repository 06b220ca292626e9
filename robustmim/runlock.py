"""One writer per output directory: an exclusive lock held for as long as a run writes there.

Two runs started on one run (or evaluation) directory would interleave their metrics, records
and checkpoints. The first takes a POSIX record lock (`fcntl.lockf`) on `<dir>/.robustmim.lock`
and keeps it until it exits; the second fails at once with a message naming the holder (host,
pid, Slurm job, start time, written into the file by the holder). POSIX locks are what NFS
(v3 through lockd, v4 natively) and Lustre or GPFS mounted with lock support honour across
nodes, and the kernel (or the NFS server, when a client's lease lapses) drops a lock whose
holder died, so a crashed run leaves nothing stale to clean by hand. The file itself stays.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from robustmim.errors import UserError

LOCK_FILE = ".robustmim.lock"


def _holder_record(what: str) -> dict:
    return {"what": what, "host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        return f"{holder['what']} (pid {holder['pid']} on {holder['host']}{job}, since {holder['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


class DirectoryLock:
    """Held from `acquire()` until `release()` or the process ends. Never open the lock file a
    second time in the holding process: closing any descriptor of it drops a POSIX lock."""

    def __init__(self, directory: str | Path, what: str):
        self.path = Path(directory) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise UserError(f"{self.path.parent} is in use by {_describe(holder)}; wait for it to end, stop "
                                f"it, or choose another directory") from None
            raise UserError(f"cannot lock {self.path}: {e} (the file system must support POSIX locks)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_record(self.what)).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

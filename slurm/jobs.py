"""Job records under a run directory and job states read from Slurm.

submitit learns a job's state from `sacct`, which needs an accounting database; without one a
job that died before writing its result looks "running" forever. Here the state comes from
`sacct` where it answers and from `scontrol show job` otherwise (Slurm keeps finished jobs
there for MinJobAge seconds), so waiting on a job never hangs on a dead one.
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
from pathlib import Path


JOBS_FILE = "jobs.jsonl"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def record_submission(out_dir: str | Path, record: dict) -> None:
    path = Path(out_dir) / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    stamped = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **record}
    with open(path, "a") as f:
        f.write(json.dumps(stamped) + "\n")


def read_submissions(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / JOBS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _run(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def job_state(job_id: str) -> str:
    """Slurm's state of a job (e.g. PENDING, RUNNING, COMPLETED, FAILED), or UNKNOWN."""
    out = _run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)])
    if out and out.strip():
        return out.split()[0].split("+")[0].upper()
    out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if out:
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
    return "UNKNOWN"


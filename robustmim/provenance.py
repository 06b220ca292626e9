"""What produced an output: the resolved config and the code's git SHA, written beside it."""

from __future__ import annotations

import datetime as _dt
import socket
import subprocess
import sys
from pathlib import Path

import robustmim
from robustmim.config import to_yaml
from robustmim.fileio import atomic_write_json, atomic_write_text

_CODE_ROOT = Path(robustmim.__file__).resolve().parent.parent


def git_state(repo: Path = _CODE_ROOT) -> dict:
    """The checkout's HEAD and whether it has uncommitted changes; 'unknown' outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": "unknown", "git_dirty": None}
    return {"git_sha": sha, "git_dirty": dirty}


def write_provenance(out_dir: str | Path, cfg: object, stage: str) -> dict:
    """Write `config.yaml` (the resolved config) and `provenance.json` into `out_dir`."""
    out_dir = Path(out_dir)
    record = {
        "stage": stage,
        **git_state(),
        "robustmim_version": robustmim.__version__,
        "argv": sys.argv,
        "host": socket.gethostname(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))
    atomic_write_json(out_dir / "provenance.json", record)
    return record

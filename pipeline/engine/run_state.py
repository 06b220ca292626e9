"""`<out_dir>/run_state.json`: how a training run's last attempt ended, written by rank 0.

`{"state": "running" | "finished" | "stopped", "step", "total_steps", "stopped_by", "time"}`.
A launcher that only sees torchrun's exit status (which folds every rank's into 0 or 1) reads it
to tell a run stopped by a signal, with its checkpoint written, from a failed one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from robustmim.fileio import atomic_write_json

RUN_STATE_FILE = "run_state.json"


def write_run_state(out_dir: str | Path, state: str, step: int, total_steps: int, stopped_by: str | None) -> None:
    atomic_write_json(Path(out_dir) / RUN_STATE_FILE, {"state": state, "step": step, "total_steps": total_steps,
                                                      "stopped_by": stopped_by, "time": time.time()})


def read_run_state(out_dir: str | Path) -> dict:
    try:
        return json.loads((Path(out_dir) / RUN_STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}

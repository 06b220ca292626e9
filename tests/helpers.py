"""Helpers shared by the test modules: launching real training runs and reading their curves."""

import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.engine.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parent.parent
ROBUSTMIM = str(Path(sys.executable).parent / "robustmim")
STEPS = 12


def settings(shards, run_dir, **extra) -> dict:
    base = {"run_dir": run_dir, "data.shards": shards, "data.split": "val", "data.image_size": 28,
            "data.channels": 1, "data.num_threads": 1, "data.shuffle_buffer": 256,
            "model.encoder": "vit_tiny_patch4", "model.decoder": "tiny", "model.img_size": 28,
            "model.in_chans": 1, "model.pixel_mean": "[0.286]", "model.pixel_std": "[0.353]",
            "objective.name": "dmae", "optim.warmup_epochs": 0.01, "optim.base_lr": 1e-3,
            "length.samples": 32 * STEPS, "global_batch": 32, "micro_batch": 16, "log_every": 1,
            "checkpoint.every_steps": 4, "checkpoint.keep_last": 2, "zero_stage": 2}
    return {**base, **extra}


def launch(shards, run_dir, nproc=2, **extra) -> subprocess.Popen:
    overrides = [f"{k}={v}" for k, v in settings(shards, run_dir, **extra).items()]
    return subprocess.Popen([ROBUSTMIM, "pretrain", "--nproc-per-node", str(nproc), *overrides], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_stage(stage, config, overrides, nproc=1, env=None) -> subprocess.Popen:
    args = [ROBUSTMIM, stage, *(["--config", config] if config else []), "--nproc-per-node", str(nproc),
            *[f"{k}={v}" for k, v in overrides.items()]]
    return subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})


def finish(proc, timeout=300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def wait_for(predicate, proc, timeout=180.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[0][-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def last_step(run_dir) -> int:
    rows = read_metrics(run_dir)
    return rows[-1]["step"] if rows else 0


def curve(run_dir) -> list[tuple]:
    return [(r["step"], r["samples"], r["loss"], r["lr"]) for r in read_metrics(run_dir)]

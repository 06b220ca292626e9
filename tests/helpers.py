"""Helpers shared by the test modules: launching real training runs, reading their curves, and the
tiny configs and inputs several modules build on. Test modules import from here (or conftest), never
from each other."""

import os
import subprocess
import sys
import time
from pathlib import Path

from robustmim.pipeline.engine.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parent.parent
ROBUSTMIM = str(Path(sys.executable).parent / "robustmim")
STEPS = 12


def settings(shards, out_dir, **extra) -> dict:
    base = {"out_dir": out_dir, "data.shards": shards, "data.split": "val", "data.image_size": 28,
            "data.channels": 1, "data.num_threads": 1, "data.shuffle_buffer": 256,
            "model.encoder": "vit_tiny_patch4", "model.decoder": "tiny", "model.img_size": 28,
            "model.in_chans": 1, "model.pixel_mean": "[0.286]", "model.pixel_std": "[0.353]",
            "objective.name": "dmae", "optim.warmup_epochs": 0.01, "optim.base_lr": 1e-3,
            "length.samples": 32 * STEPS, "global_batch": 32, "micro_batch": 16, "log_every": 1,
            "checkpoint.every_steps": 4, "checkpoint.keep_last": 2, "zero_stage": 2}
    return {**base, **extra}


def launch(shards, out_dir, nproc=2, **extra) -> subprocess.Popen:
    overrides = [f"{k}={v}" for k, v in settings(shards, out_dir, **extra).items()]
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


def last_step(out_dir) -> int:
    rows = read_metrics(out_dir)
    return rows[-1]["step"] if rows else 0


def curve(out_dir) -> list[tuple]:
    return [(r["step"], r["samples"], r["loss"], r["lr"]) for r in read_metrics(out_dir)]


# Tiny configs and inputs shared by several test modules.

def tiny_model_config(**values):
    """The masked autoencoder at Fashion-MNIST scale (vit_tiny_patch4 + the tiny decoder)."""
    from robustmim.config import load_config
    from robustmim.pipeline.models.config import ModelConfig

    base = dict(encoder="vit_tiny_patch4", decoder="tiny", img_size=28, in_chans=1,
                pixel_mean="[0.286]", pixel_std="[0.353]")
    return load_config(ModelConfig, None, [f"{k}={v}" for k, v in {**base, **values}.items()])


def tiny_classifier_config(**values):
    """The ViT classifier at Fashion-MNIST scale, 10 classes."""
    from robustmim.config import load_config
    from robustmim.pipeline.models.config import ClassifierConfig

    base = dict(encoder="vit_tiny_patch4", img_size=28, in_chans=1, pixel_mean="[0.286]", pixel_std="[0.353]",
                num_classes=10)
    return load_config(ClassifierConfig, None, [f"{k}={v}" for k, v in {**base, **values}.items()])


TOKENIZER_CONFIG = "configs/tokenizer/tiny_fmnist.yaml"


def tiny_tokenizer_config(**overrides):
    """The demo's tokenizer config (configs/tokenizer/tiny_fmnist.yaml) with overrides."""
    from robustmim.config import load_config
    from robustmim.pipeline.tokenizer.config import TokenizerConfig

    return load_config(TokenizerConfig, TOKENIZER_CONFIG,
                       [f"{k}={v}" for k, v in {"out_dir": "x", **overrides}.items()])


def val_images(shards, every_nth: int):
    """Every `every_nth` validation image of the shards, unaugmented, as one [N, 1, 28, 28] tensor."""
    import dataclasses

    import torch

    from robustmim.pipeline.data.dali import DaliLoader

    cfg = tiny_tokenizer_config(**{"data.shards": shards})
    data = dataclasses.replace(cfg.data, split="val", augment=False, batch_size=500)
    batches = [b.images for b in DaliLoader(data, 0, 1, 0, train=False)]
    return torch.cat(batches)[::every_nth]


def wandb_offline_runs(out_dir) -> dict[str, list[list[dict]]]:
    """What W&B's offline mode wrote under <out_dir>/wandb/: run id -> one list of history rows
    ({key: value}) per attempt, oldest first. The .wandb file is W&B's record log (a LevelDB-style
    log of 32 KiB blocks, each record a header of checksum, length and type, then a piece of a
    protobuf `Record`); the records are decoded with W&B's own protobuf classes."""
    import json as json_module

    from wandb.proto import wandb_internal_pb2

    runs: dict[str, list[list[dict]]] = {}
    for attempt in sorted(Path(out_dir, "wandb").glob("offline-run-*")):
        (log_file,) = attempt.glob("run-*.wandb")
        data, pos, pending, rows = log_file.read_bytes(), 7, b"", []
        assert data[:4] == b":W&B", log_file
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json_module.loads(item.value_json)
                                 for item in record.history.item})
        runs.setdefault(attempt.name.rsplit("-", 1)[1], []).append(rows)
    return runs


def wait_finished(job_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
    """Poll Slurm until the job is in a final state; returns it (fails the test on timeout)."""
    from robustmim.slurm.jobs import FINISHED, job_state

    deadline = time.monotonic() + timeout_s
    while True:
        state = job_state(job_id)
        if state in FINISHED:
            return state
        assert time.monotonic() < deadline, f"job {job_id} still {state} after {timeout_s:.0f} s"
        time.sleep(poll_s)

"""Faults around a run directory: code planted in a checkpoint, a missing `latest`, a damaged
checkpoint file, a full disk during a save or a shard build, a killed build parent. Each case
on the real engine (DeepSpeed under torchrun, 2 gloo ranks) or the real shard builder."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import torch

from robustmim.errors import UserError
from robustmim.pipeline.engine.checkpoint import LATEST, METADATA
from robustmim.pipeline.engine.export import export_checkpoint
from robustmim.pipeline.engine.metrics import SUPERSEDED_FILE
from robustmim.shards.manifest import load_manifest

from conftest import REPO_ROOT
from helpers import ROBUSTMIM, curve, finish, launch, settings


class PlantedCode:
    """What an attacker pickles into a checkpoint: unpickling it creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(out_dir, tag: str, name: str, marker) -> None:
    """Replace one file of a real checkpoint with a pickle that runs code, and record its size and
    digest in the checkpoint's metadata, as a crafted directory would."""
    tag_dir = out_dir / "checkpoints" / tag
    torch.save({"module": {}, "payload": PlantedCode(marker)}, tag_dir / name)
    meta = json.loads((tag_dir / METADATA).read_text())
    data = (tag_dir / name).read_bytes()
    meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (tag_dir / METADATA).write_text(json.dumps(meta))


@pytest.mark.distributed
@pytest.mark.slow
def test_a_checkpoint_holding_code_is_refused_by_export_and_resume(tmp_path, fashion_val_shards, references):
    out_dir = tmp_path / "run"
    shutil.copytree(references[1], out_dir)
    marker = tmp_path / "code_ran"
    plant(out_dir, "step_00000012", "mp_rank_00_model_states.pt", marker)

    with pytest.raises(UserError, match=r"refusing .*step_00000012/mp_rank_00_model_states.pt: .*asks to run io.open"):
        export_checkpoint(out_dir, tmp_path / "out.safetensors")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()

    overrides = [f"{k}={v}" for k, v in settings(fashion_val_shards, out_dir, zero_stage=1).items()]
    resumed = subprocess.run([ROBUSTMIM, "pretrain", "--nproc-per-node", "2", *overrides], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode != 0 and "refusing" in resumed.stdout + resumed.stderr
    assert not marker.exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_missing_latest_and_a_truncated_file_fall_back_to_the_previous_checkpoint(tmp_path, fashion_val_shards,
                                                                                  references):
    """`latest` gone and step 12's optimizer shard cut in half: the run warns, moves step 12 aside,
    resumes from step 8 and repeats steps 9-12 exactly; the log rows it replaces are kept."""
    out_dir = tmp_path / "run"
    shutil.copytree(references[2], out_dir)
    (out_dir / "checkpoints" / LATEST).unlink()
    shard = out_dir / "checkpoints" / "step_00000012" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    old_rows = (out_dir / "metrics.jsonl").read_text().splitlines()

    out = finish(launch(fashion_val_shards, out_dir))
    assert "checkpoints/latest is missing; resuming from the newest complete checkpoint, step_00000012" in out
    assert f"checkpoint step_00000012 is damaged: {shard} has" in out and "truncated" in out
    assert (out_dir / "checkpoints" / "damaged" / "step_00000012" / shard.name).is_file()
    assert curve(out_dir) == curve(references[2])
    assert (out_dir / SUPERSEDED_FILE).read_text().splitlines() == old_rows[8:]  # steps 9-12 of the old log
    assert (out_dir / "checkpoints" / LATEST).read_text() == "step_00000012"


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MB (the tests run as root): the disk that fills up."""
    mount = tmp_path / "small"
    mount.mkdir()

    def resize(megabytes: int, first: bool = False) -> None:
        options = f"size={megabytes}m" if first else f"remount,size={megabytes}m"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], check=True)

    resize(48, first=True)
    yield mount, resize
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_save_is_a_clear_error_and_latest_stays_valid(small_disk,
                                                                                    fashion_val_shards):
    """One checkpoint of this model on one rank takes ~35 MB: the second does not fit in 48 MB."""
    mount, _ = small_disk
    out_dir = mount / "run"
    overrides = settings(fashion_val_shards, out_dir, **{"checkpoint.every_steps": 2, "checkpoint.keep_last": 3,
                                                         "length.samples": 32 * 6, "zero_stage": 1})
    result = subprocess.run([ROBUSTMIM, "pretrain", *[f"{k}={v}" for k, v in overrides.items()]], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"could not save checkpoint {out_dir / 'checkpoints' / 'step_00000004'}" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out_dir / "checkpoints" / LATEST).read_text() == "step_00000002"


def test_a_full_disk_stops_a_shard_build_cleanly_and_the_build_resumes(small_disk, fashion_dir):
    mount, resize = small_disk
    resize(8)  # the val split's shards take ~33 MB
    out = mount / "shards"
    command = [ROBUSTMIM, "shards", "build", "source=fashion_mnist", f"input={fashion_dir}", f"out_dir={out}",
               "splits=[val]", "shard_max_samples=500", "workers=2"]
    full = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert full.returncode == 2 and f"writing shards into {out} failed" in full.stderr, full.stderr[-3000:]
    assert "Traceback" not in full.stderr and not (out / "manifest.json").exists()
    resize(64)
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "completed shard(s) kept" in again.stderr
    assert load_manifest(out).splits["val"].total == 10000


def test_shard_build_workers_end_when_the_parent_is_killed(tmp_path, fashion_dir):
    proc = subprocess.Popen([ROBUSTMIM, "shards", "build", "source=fashion_mnist", f"input={fashion_dir}",
                             f"out_dir={tmp_path / 'shards'}", "shard_max_samples=2000", "workers=2"],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    while len(workers := parent.children(recursive=True)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the build never started its workers"
        time.sleep(0.05)
    time.sleep(1.0)  # the workers are past their start-up and writing shards
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"workers still running after their parent died: {[p.pid for p in alive]}"


@pytest.mark.distributed
@pytest.mark.slow
def test_shards_are_hashed_after_a_killed_rank_but_not_after_a_rank_error(tmp_path, fashion_val_shards):
    """A rank killed outright (here SIGKILL, as the OOM killer or a decoder crash ends one) leaves
    no message: the launching command checks the shards. A rank that failed with an error said
    why, and the shards (ImageNet: hours of hashing) are left alone."""
    proc = launch(fashion_val_shards, tmp_path / "killed", **{"length.samples": 32 * 400})
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed" / "metrics.jsonl").is_file():  # training has started on both ranks
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-2000:]
        time.sleep(0.05)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "robustmim.cli" in p.cmdline() and "torch.distributed.run" not in p.cmdline()]
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    ranks[1].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "a rank was killed without an error message; checking the sha256" in out, out[-3000:]
    assert "damaged shards" not in out  # they are intact

    failed = subprocess.run([ROBUSTMIM, "pretrain", "--nproc-per-node", "2",
                             *[f"{k}={v}" for k, v in settings(tmp_path / "missing", tmp_path / "error").items()]],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "robustmim pretrain: error:" in out and "missing" in out, out[-3000:]
    assert "checking the sha256" not in out

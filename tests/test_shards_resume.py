"""Interrupting a build (SIGKILL of the whole process group) and resuming it."""

import os
import signal
import subprocess
import sys
import time

from robustmim.fileio import sha256_of_file
from robustmim.shards.manifest import load_manifest

from conftest import REPO_ROOT, build

# Fashion-MNIST's val split in 20 shards of 500: long enough to interrupt, quick to finish.
SETTINGS = dict(source="fashion_mnist", splits="[val]", shard_max_samples=500, workers=1)


def _cli_build(out, **values):
    args = [f"{k}={v}" for k, v in {**SETTINGS, **values, "out": out}.items()]
    return subprocess.Popen([sys.executable, "-m", "robustmim.cli", "shards", "build", *args],
                            cwd=REPO_ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_after_records(proc, out, n_records: int, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while len(list((out / ".build").glob("*.json"))) < n_records:
        assert proc.poll() is None, "the build ended before it could be interrupted"
        assert time.monotonic() < deadline, "the build made no progress"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its writer processes, mid-shard
    proc.wait()


def test_interrupted_build_resumes_to_identical_shards(tmp_path, fashion_dir):
    _, reference = build(**SETTINGS, input=fashion_dir, out_dir=tmp_path / "reference")
    out = tmp_path / "interrupted"
    _kill_after_records(_cli_build(out, input=fashion_dir), out, n_records=4)

    assert not (out / "manifest.json").exists()  # never a manifest over an unfinished build
    completed = {p.stem for p in (out / ".build").glob("*.json")}
    stat_before = {name: (out / f"{name}.tar").stat() for name in completed}
    assert 4 <= len(completed) < 20

    _, resumed = build(**SETTINGS, input=fashion_dir, out_dir=out)
    for name, before in stat_before.items():  # completed shards were kept, not rewritten
        after = (out / f"{name}.tar").stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert resumed.splits == reference.splits  # same shards, counts and sha256s
    for e in resumed.splits["val"].shards:
        assert sha256_of_file(out / e.name) == e.sha256
        assert (out / e.index).read_bytes() == (tmp_path / "reference" / e.index).read_bytes()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or ".tmp-" in p.name]


def test_resume_rewrites_a_completed_shard_that_no_longer_checks(tmp_path, fashion_dir):
    out = tmp_path / "out"
    _, first = build(**SETTINGS, input=fashion_dir, out_dir=out)
    damaged = out / first.splits["val"].shards[3].name
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    untouched = out / first.splits["val"].shards[4].name
    mtime = untouched.stat().st_mtime_ns

    _, second = build(**SETTINGS, input=fashion_dir, out_dir=out)
    assert second.splits == first.splits
    assert sha256_of_file(damaged) == first.splits["val"].shards[3].sha256
    assert untouched.stat().st_mtime_ns == mtime


def test_rebuild_with_other_settings_leaves_no_stale_shards(tmp_path, fashion_dir):
    out = tmp_path / "out"
    build(**SETTINGS, input=fashion_dir, out_dir=out)
    _, m = build(**{**SETTINGS, "shard_max_samples": 2500}, input=fashion_dir, out_dir=out)
    on_disk = sorted(p.name for p in out.glob("val-*"))
    listed = sorted(n for e in m.splits["val"].shards for n in (e.name, e.index))
    assert on_disk == listed and len(m.splits["val"].shards) == 4
    assert load_manifest(out).splits["val"].total == 10000

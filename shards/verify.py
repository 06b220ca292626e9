"""`robustmim shards verify`: check a shard directory against its manifest.

Per shard: present, size and sha256 as recorded, the tar readable to its end, every sample
complete (label, int32 label, image) with consistent labels in range, every image (or a
seeded sample of them) decodable, the sample count as recorded, and the DALI index equal to
the one the tar's headers give. Each problem names its shard and, where it is one sample's,
the sample key. The outcome is recorded in the manifest, where loaders look for it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import struct
import tarfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from robustmim.fileio import sha256_of_file
from robustmim.shards.images import IMAGE_EXTENSIONS, UndecodableImage, decode_checked
from robustmim.shards.manifest import ShardEntry, load_manifest, save_manifest
from robustmim.shards.parallel import run_parallel
from robustmim.shards.plan import SHARD_FILE
from robustmim.shards.tario import dali_index_text, iter_samples, split_member_name


@dataclass
class Problem:
    split: str
    shard: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.shard} [{self.key}]" if self.key else self.shard
        return f"{where}: {self.message}"


def _selected(key: str, fraction: float, seed: int) -> bool:
    return fraction >= 1.0 or zlib.crc32(f"{seed}:{key}".encode()) / 2**32 < fraction


def _check_sample(tar: tarfile.TarFile, key: str, members: list[tarfile.TarInfo], num_classes: int,
                  decode: bool) -> list[str]:
    by_ext = {split_member_name(m.name)[1]: m for m in members}
    images = [e for e in IMAGE_EXTENSIONS if e in by_ext]
    missing = [e for e in ("cls", "cls.i32") if e not in by_ext] + ([] if images else ["jpg|png"])
    if missing:
        return [f"sample lacks member(s) {missing}"]
    read = lambda ext: tar.extractfile(by_ext[ext]).read()  # noqa: E731
    problems = []
    try:
        label = int(read("cls"))
    except ValueError:
        return [f"label {read('cls')[:20]!r} is not an integer"]
    raw = read("cls.i32")
    if len(raw) != 4 or struct.unpack("<i", raw)[0] != label:
        problems.append(f"int32 label {raw!r} differs from label {label}")
    if not 0 <= label < num_classes:
        problems.append(f"label {label} outside 0..{num_classes - 1}")
    if "json" in by_ext:
        try:
            json.loads(read("json"))
        except ValueError:
            problems.append("metadata is not valid JSON")
    if decode:
        try:
            decode_checked(read(images[0]))
        except UndecodableImage as e:
            problems.append(f"image .{images[0]}: {e}")
    return problems


def verify_shard(shard_dir: str, split: str, entry: ShardEntry, num_classes: int,
                 fraction: float, seed: int) -> list[Problem]:
    path = Path(shard_dir) / entry.name
    problems: list[Problem] = []
    add = lambda message, key=None: problems.append(Problem(split, entry.name, key, message))  # noqa: E731
    if not path.is_file():
        add("missing")
        return problems
    size = path.stat().st_size
    if size != entry.bytes:
        add(f"{size} bytes, the manifest says {entry.bytes} (truncated or altered)")
    if sha256_of_file(path) != entry.sha256:
        add("sha256 differs from the manifest (the bytes changed)")
    count, readable = 0, True
    try:
        with tarfile.open(path, mode="r:") as tar:
            for key, members in iter_samples(tar):
                count += 1
                for message in _check_sample(tar, key, members, num_classes, _selected(key, fraction, seed)):
                    add(message, key)
    except (tarfile.TarError, EOFError, OSError) as e:
        readable = False
        add(f"tar unreadable after {count} samples: {e}")
    if count != entry.samples:
        add(f"{count} samples, the manifest says {entry.samples}")
    index_path = Path(shard_dir) / entry.index
    if not index_path.is_file():
        add(f"DALI index {entry.index} is missing")
    elif readable and index_path.read_text() != dali_index_text(path):
        add(f"DALI index {entry.index} does not match the tar")
    return problems


def verify_dir(shard_dir: str | Path, fraction: float = 1.0, seed: int = 0, workers: int = 0,
               record: bool = True) -> tuple[list[Problem], list[str]]:
    """(problems, notes) for a shard directory; records the outcome in its manifest if `record`."""
    manifest = load_manifest(shard_dir)
    jobs = [(str(shard_dir), split, entry, manifest.num_classes, fraction, seed)
            for split, s in manifest.splits.items() for entry in s.shards]
    results = run_parallel(verify_shard, jobs, workers or os.cpu_count() or 1, "verifying shards",
                           [job[2].samples for job in jobs], "img")
    problems = sorted((p for r in results for p in r), key=lambda p: (p.shard, p.key or ""))
    listed = {e.name.removesuffix(".tar") for _, _, e, *_ in jobs}
    notes = [f"{p.name}: on disk but not in the manifest" for p in sorted(Path(shard_dir).iterdir())
             if (m := SHARD_FILE.match(p.name)) and m["name"] not in listed]
    if record:
        manifest.verification = {
            "status": "failed" if problems else "passed",
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "decoded_fraction": fraction,
            "problems": len(problems),
            "bad_shards": sorted({p.shard for p in problems}),
            "first_problems": [asdict(p) for p in problems[:20]],
        }
        save_manifest(shard_dir, manifest)
    return problems, notes

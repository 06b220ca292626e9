"""The shards of one split, checked against their manifest before any loader starts.

DALI cannot be trusted with damaged input (a truncated shard or a bad image can crash or hang
the process), so every problem that can be seen from the outside is an error here, naming the
shard, before training starts: a manifest whose last verification failed, a shard or index
missing from disk, a shard whose size (or, with verify_hashes, sha256) differs, an index whose
sha256 or sample count differs from the manifest's (DALI trusts an index blindly: an edited one
swaps labels or drops samples without a word; indexes are small, so this check is always on).

Same-size damage inside a shard is only caught up front by `verify_hashes=true`, which reads the
whole split once at start-up (about 1 s per GB on one core; ImageNet's 140 GB take minutes, once
per (re)start). Without it, a damaged image fails inside DALI; `describe_damage` then names the
shard and sample that do not match the manifest (or, worse, a bad JPEG can crash DALI's CPU
decoder outright, which no check after the fact can catch).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from robustmim.errors import UserError
from robustmim.fileio import sha256_of_file
from robustmim.shards.manifest import Manifest, load_manifest


@dataclass(frozen=True)
class ShardSet:
    directory: Path
    split: str
    tar_paths: list[str]
    index_paths: list[str]
    samples_per_shard: list[int]
    num_classes: int
    sha256s: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.samples_per_shard)

    def fingerprint(self) -> str:
        """Identifies the exact shard list (names and sample counts, not where the directory
        lives: a run may resume from moved shards), so a saved loader position is only applied
        to it."""
        names = [f"{Path(tar).name}:{count}" for tar, count in zip(self.tar_paths, self.samples_per_shard)]
        return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]

    def path_fingerprint(self) -> str:
        """The fingerprint positions saved before 2026-11-30 hold (the shards' full paths)."""
        return hashlib.sha256("\n".join(self.tar_paths).encode()).hexdigest()[:16]


def open_shards(directory: str | Path, split: str, verify_hashes: bool = False) -> ShardSet:
    directory = Path(directory)
    manifest: Manifest = load_manifest(directory)
    verification = manifest.verification
    if verification and verification.get("status") == "failed":
        raise UserError(f"{directory}: the last `robustmim shards verify` ({verification.get('time')}) failed "
                        f"on {verification.get('bad_shards')}; rebuild those shards, then verify again")
    if split not in manifest.splits:
        raise UserError(f"{directory}: no split '{split}' in the manifest (has {sorted(manifest.splits)})")
    entries = manifest.splits[split].shards
    if not entries:
        raise UserError(f"{directory}: split '{split}' has no samples")
    for entry in entries:
        tar, index = directory / entry.name, directory / entry.index
        if not tar.is_file():
            raise UserError(f"shard missing from disk: {tar}")
        size = tar.stat().st_size
        if size != entry.bytes:
            raise UserError(f"shard {tar} has {size} bytes, the manifest says {entry.bytes} "
                            "(truncated or altered): run `robustmim shards verify` and rebuild it")
        if not index.is_file():
            raise UserError(f"DALI index missing from disk: {index}")
        _check_index(index, entry)
        if verify_hashes and sha256_of_file(tar) != entry.sha256:
            raise UserError(f"shard {tar}: sha256 differs from the manifest: rebuild it")
    return ShardSet(directory, split, [str(directory / e.name) for e in entries],
                    [str(directory / e.index) for e in entries], [e.samples for e in entries],
                    manifest.num_classes, tuple(e.sha256 for e in entries))


def _check_index(index: Path, entry) -> None:
    data = index.read_bytes()
    if entry.index_sha256 and hashlib.sha256(data).hexdigest() != entry.index_sha256:
        raise UserError(f"DALI index {index} differs from the one built with its shard (sha256): it could swap "
                        f"labels or drop samples; rebuild it with `robustmim shards build` (or delete it and "
                        f"rebuild)")
    header = data.split(b"\n", 1)[0].split()
    count = int(header[1]) if len(header) == 2 and header[1].isdigit() else None
    if count != entry.samples:
        raise UserError(f"DALI index {index} lists {count} samples, the manifest {entry.samples} for {entry.name}")


def describe_damage(shards: ShardSet) -> str:
    """After a loader failure: the shards whose sha256 differs from the manifest and, in each, the
    samples whose image no longer decodes (read with the standard library and PIL, not DALI)."""
    import io
    import tarfile

    from PIL import Image

    found = []
    for tar_path, digest in zip(shards.tar_paths, shards.sha256s):
        if sha256_of_file(tar_path) == digest:
            continue
        bad = []
        try:
            with tarfile.open(tar_path) as tar:
                for member in tar:
                    if member.name.endswith((".jpg", ".png")):
                        try:
                            with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                                image.load()
                        except Exception:  # noqa: BLE001 - any decoder error marks the sample
                            bad.append(member.name.rsplit(".", 1)[0])
        except tarfile.TarError as e:
            bad.append(f"(tar unreadable: {e})")
        found.append(f"{tar_path} (sha256 differs from the manifest; samples that fail to decode: "
                     f"{', '.join(bad[:10]) or 'none, but its bytes changed'})")
    return "; ".join(found)

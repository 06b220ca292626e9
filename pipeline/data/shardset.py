"""The shards of one split, checked against their manifest before any loader starts.

DALI cannot be trusted with damaged input (a truncated shard or a bad image can crash or hang
the process), so every problem that can be seen from the outside is an error here, naming the
shard, before training starts: a manifest whose last verification failed, a shard or index
missing from disk, a shard whose size (or, with verify_hashes, sha256) differs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from robustmim.errors import UserError
from robustmim.fileio import sha256_of_file
from shards.manifest import Manifest, load_manifest


@dataclass(frozen=True)
class ShardSet:
    directory: Path
    split: str
    tar_paths: list[str]
    index_paths: list[str]
    samples_per_shard: list[int]
    num_classes: int

    @property
    def total(self) -> int:
        return sum(self.samples_per_shard)

    def fingerprint(self) -> str:
        """Identifies the exact shard list, so a saved loader position is only applied to it."""
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
        if verify_hashes and sha256_of_file(tar) != entry.sha256:
            raise UserError(f"shard {tar}: sha256 differs from the manifest: rebuild it")
    return ShardSet(directory, split, [str(directory / e.name) for e in entries],
                    [str(directory / e.index) for e in entries], [e.samples for e in entries],
                    manifest.num_classes)

"""Which sample goes to which shard: a seeded global shuffle, then greedy filling by size.

The plan is a pure function of the listed samples, the seed and the size limits, so a re-run
(or a resume after an interruption) plans exactly the same shards. Each shard's fingerprint
covers its ordered samples and the on-disk format, and says whether a completed shard on
disk is still the one the plan wants.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass

import numpy as np

from robustmim.shards.sources import SourceSample

# Bumped whenever the bytes written for the same samples change (member layout, encoding).
SHARD_FORMAT_VERSION = 1
_TAR_BLOCK = 512


# A shard's tar or DALI index file, as shard_name() names them.
SHARD_FILE = re.compile(r"^(?P<name>[a-z]+-\d{6})\.(tar|idx)$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


@dataclass
class ShardPlan:
    split: str
    index: int
    samples: list[SourceSample]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    def fingerprint(self) -> str:
        listing = [[s.key, s.label, s.size_hint, str(s.ref)] for s in self.samples]
        blob = json.dumps([SHARD_FORMAT_VERSION, self.split, self.index, listing]).encode()
        return hashlib.sha256(blob).hexdigest()


def _blocks(n: int) -> int:
    return -(-n // _TAR_BLOCK) * _TAR_BLOCK


def estimated_tar_bytes(sample: SourceSample) -> int:
    """Header and padded data of the image, plus the label members and a small json."""
    return _TAR_BLOCK + _blocks(sample.size_hint) + 3 * 2 * _TAR_BLOCK


def shuffle_order(n: int, seed: int, split: str) -> np.ndarray:
    """A permutation of range(n) fixed by (seed, split); splits get independent shuffles."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    return rng.permutation(n)


def plan_split(split: str, samples: list[SourceSample], seed: int,
               max_bytes: int, max_samples: int = 0) -> list[ShardPlan]:
    shards: list[ShardPlan] = []
    current: list[SourceSample] = []
    current_bytes = 0
    for i in shuffle_order(len(samples), seed, split):
        sample = samples[i]
        size = estimated_tar_bytes(sample)
        full = (max_samples and len(current) >= max_samples) or (current and current_bytes + size > max_bytes)
        if full:
            shards.append(ShardPlan(split, len(shards), current))
            current, current_bytes = [], 0
        current.append(sample)
        current_bytes += size
    if current:
        shards.append(ShardPlan(split, len(shards), current))
    return shards

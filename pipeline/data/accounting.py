"""A run's length in samples, and samples seen per rank and in total.

Runs are specified in samples (or in epochs of the split, turned into samples with the
manifest's count), never in loader epochs: training streams are endless and every rank draws
equal batches, so a run of S samples is ceil(S / global batch) steps whatever the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class RunLength:
    samples: int = 0  # all ranks together; when set (> 0) it takes precedence over epochs
    epochs: float = 0.0  # of the training split

    def __post_init__(self) -> None:
        if self.samples < 0 or self.epochs < 0 or not (self.samples or self.epochs):
            raise ValueError(f"a run length needs samples or epochs > 0 (got samples={self.samples}, "
                             f"epochs={self.epochs})")

    def total_samples(self, split_size: int) -> int:
        return self.samples if self.samples else round(self.epochs * split_size)

    def steps(self, split_size: int, global_batch: int) -> int:
        return math.ceil(self.total_samples(split_size) / global_batch)


def samples_seen_total(samples_seen_on_rank: int) -> int:
    """Sum of every rank's count. A collective and a host sync: call it at logging intervals."""
    if not (dist.is_available() and dist.is_initialized()):
        return samples_seen_on_rank
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    count = torch.tensor([samples_seen_on_rank], dtype=torch.int64, device=device)
    dist.all_reduce(count)
    return int(count.item())

"""A run's length in samples (or epochs of the split).

Runs are specified in samples (or in epochs of the split, turned into samples with the
manifest's count), never in loader epochs: training streams are endless and every rank draws
equal batches, so a run of S samples is ceil(S / global batch) steps whatever the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass



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


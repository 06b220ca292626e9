"""The validation split as a task's `validate` reads it: each rank its exact chunk (no padded
duplicates) of samples 0, n, 2n, ... (`validation.every_nth`), the same set for any rank count."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from robustmim.pipeline.data.dali import DaliLoader
from robustmim.pipeline.dist import DistEnv
from robustmim.pipeline.engine.config import EngineConfig, ValidationConfig


def validation_batches(cfg: EngineConfig, validation: ValidationConfig, env: DistEnv
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images in [0, 1], labels) of this rank's selected validation samples, batch by batch."""
    data = dataclasses.replace(cfg.data, split=validation.split, augment=False, batch_size=validation.batch_size)
    loader = DaliLoader(data, env.rank, env.world_size, env.local_rank, train=False)
    index = loader.first_index
    for batch in loader:
        count = batch.labels.shape[0]
        keep = [i for i in range(count) if (index + i) % validation.every_nth == 0]  # host ints: no sync
        index += count
        if keep:
            yield batch.images[keep], batch.labels[keep]

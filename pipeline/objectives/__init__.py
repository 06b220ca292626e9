"""Pretraining objectives: MAE, NIM, DMAE and MIMIR over one masked autoencoder.

Each is a small class with one interface: `objective(model, images01, generator)` takes a
batch of [0, 1] images and a seeded generator on the batch's device, and returns the loss and
a dict of detached metric tensors. `build_objective(cfg)` picks one by name.
"""

from pipeline.objectives.base import ObjectiveOutput, step_generator
from pipeline.objectives.config import ObjectiveConfig, ObjectiveName
from pipeline.objectives.dmae import DMAE
from pipeline.objectives.mae import MAE
from pipeline.objectives.mimir import MIMIR
from pipeline.objectives.nim import NIM

OBJECTIVES = {ObjectiveName.mae: MAE, ObjectiveName.nim: NIM, ObjectiveName.dmae: DMAE, ObjectiveName.mimir: MIMIR}


def build_objective(cfg: ObjectiveConfig):
    return OBJECTIVES[cfg.name](getattr(cfg, cfg.name.value), cfg.norm_pix_loss)


__all__ = ["ObjectiveConfig", "ObjectiveName", "ObjectiveOutput", "build_objective", "step_generator",
           "MAE", "NIM", "DMAE", "MIMIR"]

"""The objectives by name: `build_objective(cfg)` returns the one `cfg.name` selects."""

from __future__ import annotations

from robustmim.pipeline.objectives.config import ObjectiveConfig, ObjectiveName
from robustmim.pipeline.objectives.dmae import DMAE
from robustmim.pipeline.objectives.mae import MAE
from robustmim.pipeline.objectives.mimir import MIMIR
from robustmim.pipeline.objectives.nim import NIM

OBJECTIVES = {ObjectiveName.mae: MAE, ObjectiveName.nim: NIM, ObjectiveName.dmae: DMAE, ObjectiveName.mimir: MIMIR}


def build_objective(cfg: ObjectiveConfig):
    return OBJECTIVES[cfg.name](getattr(cfg, cfg.name.value), cfg.norm_pix_loss)

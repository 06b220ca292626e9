"""`robustmim pretrain`'s configuration: the engine's settings plus the autoencoder and its objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from robustmim.pipeline.engine.config import EngineConfig
from robustmim.pipeline.models.config import ModelConfig
from robustmim.pipeline.objectives.config import ObjectiveConfig


@dataclass
class PretrainConfig(EngineConfig):
    hashed_sections: ClassVar[tuple[str, ...]] = EngineConfig.hashed_sections + ("model", "objective")

    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_model_input(self.model.img_size, self.model.in_chans)

"""What one pretraining step costs per image, by objective (for MFU and the benches), from the
counting primitives of pipeline/flops.py."""

from __future__ import annotations

from robustmim.pipeline.flops import FUSED_ATTENTION_BACKWARD, autoencoder_pass
from robustmim.pipeline.models.config import ModelConfig
from robustmim.pipeline.objectives.config import ObjectiveConfig, ObjectiveName


def pretraining_flops_per_image(model: ModelConfig, objective: ObjectiveConfig, batch_size: int,
                             attention_backward: float = FUSED_ATTENTION_BACKWARD) -> float:
    """FLOPs of one pretraining step divided by the per-rank batch (MIMIR's nHSIC depends on it)."""
    name = objective.name
    ratio = getattr(objective, name.value).mask_ratio
    main = autoencoder_pass(model, ratio).training(attention_backward)
    if name is not ObjectiveName.mimir:
        return main
    attack = objective.mimir.steps * autoencoder_pass(model, ratio).input_gradient(attention_backward)
    latent_dim = (1 + int(model.num_patches * (1 - ratio))) * model.embed_dim
    pixels = model.in_chans * model.img_size**2
    m = batch_size
    # Gram matrices of the latent (forward + gradients of both factors) and of the attacked
    # input (forward only), and the one m x m matmul in the backward of the latent's solve.
    hsic = (3 * 2 * m * m * latent_dim + 2 * m * m * pixels + 2 * m**3) / m
    return main + attack + hsic

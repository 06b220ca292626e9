"""The analytic FLOP count per training image against torch.utils.flop_counter.FlopCounterMode."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from robustmim.config import load_config
from robustmim.pipeline.flops import MATH_ATTENTION_BACKWARD, autoencoder_pass
from robustmim.pipeline.models.config import ModelConfig
from robustmim.pipeline.models.mae import MaskedAutoencoder
from robustmim.pipeline.objectives.config import ObjectiveConfig
from robustmim.pipeline.objectives.registry import build_objective
from robustmim.pipeline.pretrain.flops import pretraining_flops_per_image
from robustmim.pipeline.randomness import step_generator

BATCH = 6


def counted_flops_per_image(model_cfg, objective_cfg):
    torch.manual_seed(0)
    model = MaskedAutoencoder(model_cfg)
    images = torch.rand(BATCH, model_cfg.in_chans, model_cfg.img_size, model_cfg.img_size)
    counter = FlopCounterMode(display=False)
    with counter:
        out = build_objective(objective_cfg)(model, images, step_generator(0, 0, 0, "cpu"))
        out.loss.backward()
    return counter.get_total_flops() / BATCH


def attention_flops(model_cfg, objective_cfg, backward):
    """The attention part of the analytic count (per image)."""
    ratio = getattr(objective_cfg, objective_cfg.name.value).mask_ratio
    attention = autoencoder_pass(model_cfg, ratio).attention
    passes = (1 + backward) + (objective_cfg.mimir.steps * (1 + backward) if objective_cfg.name.value == "mimir" else 0)
    return passes * attention


MODELS = [("vit_tiny_patch4", 28, 1), ("vit_tiny6_patch4", 32, 3)]


@pytest.mark.parametrize("encoder, size, channels", MODELS)
@pytest.mark.parametrize("name", ["mae", "nim", "dmae", "mimir"])
def test_flop_count_matches_flop_counter_mode(encoder, size, channels, name):
    model_cfg = load_config(ModelConfig, None, [f"encoder={encoder}", "decoder=tiny", f"img_size={size}",
                                                f"in_chans={channels}", f"pixel_mean={[0.5] * channels}",
                                                f"pixel_std={[0.5] * channels}"])
    objective_cfg = load_config(ObjectiveConfig, None, [f"name={name}"])
    # The math backend runs attention as batched matmuls, which FlopCounterMode counts; with it
    # the whole analytic count must match exactly.
    with sdpa_kernel(SDPBackend.MATH):
        counted = counted_flops_per_image(model_cfg, objective_cfg)
    predicted = pretraining_flops_per_image(model_cfg, objective_cfg, BATCH, attention_backward=MATH_ATTENTION_BACKWARD)
    assert predicted == pytest.approx(counted, rel=1e-9)
    # The default CPU backend is a fused kernel FlopCounterMode does not count: everything but
    # attention must still match, so the fused path runs the same matmuls.
    counted_fused = counted_flops_per_image(model_cfg, objective_cfg)
    fused_predicted = pretraining_flops_per_image(model_cfg, objective_cfg, BATCH)
    assert fused_predicted - attention_flops(model_cfg, objective_cfg, 2.5) == pytest.approx(counted_fused, rel=1e-9)


def test_mae_vit_large_is_about_124_gflops_per_image():
    """The hand derivation for MAE-L/16 at 75% masking: ~20.6 GMAC forward, ~124 GFLOPs to train (3x forward)."""
    cfg = load_config(ModelConfig, None, ["encoder=vit_large_patch16"])
    mae = pretraining_flops_per_image(cfg, load_config(ObjectiveConfig, None, ["name=mae"]), 64)
    assert autoencoder_pass(cfg, 0.75).forward / 2 == pytest.approx(20.6e9, rel=0.02)
    assert mae == pytest.approx(124e9, rel=0.03)
    nim = pretraining_flops_per_image(cfg, load_config(ObjectiveConfig, None, ["name=nim"]), 64)
    assert nim / mae > 3  # the encoder sees all 196 tokens instead of 49


def test_the_fused_attention_backward_factor_is_what_flop_counter_mode_counts_for_flash_kernels():
    """FlopCounterMode's formulas for the flash / memory-efficient / cuDNN kernels (which it
    counts on GPUs; the CPU's fused kernel it does not): the backward recomputes the scores and
    runs four more matmuls, 2.5 times the forward's two, for ViT-L's and the tiny ViT's shapes."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    from robustmim.pipeline.flops import FUSED_ATTENTION_BACKWARD

    for shape in ((64, 16, 50, 64), (8, 3, 17, 64)):  # batch, heads, tokens, head dim
        assert sdpa_backward_flop_count(shape, shape, shape, shape) == \
            FUSED_ATTENTION_BACKWARD * sdpa_flop_count(shape, shape, shape)

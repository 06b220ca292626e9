"""timm's ViT building blocks import and run with the pinned CPU torch."""

import torch


def test_timm_vit_blocks_run():
    from robustmim.pipeline.timm_import import timm
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import Block

    embed = PatchEmbed(img_size=28, patch_size=4, in_chans=1, embed_dim=32)
    tokens = embed(torch.randn(2, 1, 28, 28))
    assert tokens.shape == (2, 49, 32)
    out = Block(dim=32, num_heads=4)(tokens)
    assert out.shape == tokens.shape and torch.isfinite(out).all()
    assert timm.__version__.startswith("1.")

"""The VQGAN's parameter layout against taming-transformers' published architecture, its numbers
against taming's own modules, and its quantizer and reconstruction as DAT uses them."""

import pytest
import torch

from robustmim.errors import UserError
from robustmim.pipeline.models.config import PRESETS, VQGANConfig
from robustmim.pipeline.models.vqgan import VQGAN, load_taming_checkpoint, reconstruct


def taming_keys(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, embed_dim, n_embed,
                in_channels=3) -> dict[str, tuple]:
    """Names and shapes of taming's VQModel (taming/models/vqgan.py, modules/diffusionmodules/model.py),
    written out from the published architecture, independently of pipeline/models/vqgan.py."""
    keys: dict[str, tuple] = {}

    def conv(name, cin, cout, k):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    levels = len(ch_mult)
    conv("encoder.conv_in", in_channels, ch, 3)
    res, block_in = resolution, ch
    for i in range(levels):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
            if res in attn_resolutions:
                attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            res //= 2
    for prefix in ("encoder", "decoder"):
        mid = ch * ch_mult[-1]
        resnet(f"{prefix}.mid.block_1", mid, mid), attn(f"{prefix}.mid.attn_1", mid)
        resnet(f"{prefix}.mid.block_2", mid, mid)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", block_in, z_channels, 3)
    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", z_channels, block_in, 3)
    for i in reversed(range(levels)):
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
            if res in attn_resolutions:
                attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            res *= 2
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", block_in, in_channels, 3)
    keys["quantize.embedding.weight"] = (n_embed, embed_dim)
    conv("quant_conv", z_channels, embed_dim, 1), conv("post_quant_conv", embed_dim, z_channels, 1)
    return keys


PUBLISHED = {  # ddconfig + codebook of the released checkpoints
    "f16_1024": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], resolution=256,
                     z_channels=256, embed_dim=256, n_embed=1024),
    "f16_16384": dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], resolution=256,
                      z_channels=256, embed_dim=256, n_embed=16384),
    "f8_16384": dict(ch=128, ch_mult=[1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[32], resolution=256,
                     z_channels=4, embed_dim=4, n_embed=16384),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_each_published_layout_has_exactly_the_taming_names_and_shapes(preset):
    with torch.device("meta"):
        model = VQGAN(PRESETS[preset])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == taming_keys(**PUBLISHED[preset])


def test_a_taming_checkpoint_loads_strictly_without_its_training_only_tensors(tmp_path):
    expected = taming_keys(**PUBLISHED["f8_16384"])
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in expected.items()}
    state["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)  # what taming's .ckpt also holds
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "vqgan_openimages_f8_16384.ckpt"
    torch.save({"state_dict": state, "global_step": 1, "epoch": 0}, path)  # Lightning's layout
    model = VQGAN(PRESETS["f8_16384"])
    assert load_taming_checkpoint(model, path) == 2
    assert torch.equal(model.state_dict()["quantize.embedding.weight"], state["quantize.embedding.weight"])
    images = torch.rand(1, 3, 32, 32, generator=generator)
    assert model.token_indices(images).shape == (1, 4, 4)  # f8: a 32-px image is 4 x 4 tokens
    assert reconstruct(model, images).shape == images.shape

    with pytest.raises(UserError, match=r"not a VQGAN of this architecture: .*\d+ missing: decoder\.up"):
        load_taming_checkpoint(VQGAN(PRESETS["f16_1024"]), path)


def test_the_quantizer_picks_the_nearest_code_and_passes_gradients_straight_through():
    cfg = VQGANConfig(in_channels=1, resolution=8, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                      z_channels=4, embed_dim=4, n_embed=16)
    model = VQGAN(cfg)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantized = model.quantize(z)
    codebook = model.quantize.embedding.weight
    brute = torch.cdist(z.detach().permute(0, 2, 3, 1).reshape(-1, 4), codebook).argmin(1)
    assert torch.equal(quantized.indices.flatten(), brute)
    quantized.codes.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through: identity in the backward pass
    images = torch.rand(3, 1, 8, 8)
    out = reconstruct(model, images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="multiples of 32"):
        VQGANConfig(ch=48, ch_mult=[1, 2])


@pytest.mark.slow
def test_encode_quantize_decode_equals_tamings_modules_on_the_same_weights():
    """taming-transformers (PyPI 0.0.1, CompVis's code): VQModel.encode is encoder -> quant_conv ->
    quantize and VQModel.decode is post_quant_conv -> decoder. VQModel itself is a Lightning module
    (it imports pytorch_lightning), so the test composes taming's Encoder, Decoder and
    VectorQuantizer exactly as those two methods do, with our weights loaded strictly."""
    import torch.nn as nn
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer

    cfg = VQGANConfig(in_channels=3, resolution=32, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16],
                      z_channels=8, embed_dim=8, n_embed=64)
    ddconfig = dict(double_z=False, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
    torch.manual_seed(0)
    ours = VQGAN(cfg).eval()
    with torch.no_grad():  # a codebook spread like the encoder's outputs, so many codes are in use
        ours.quantize.embedding.weight.normal_()
    taming = nn.ModuleDict({"encoder": Encoder(**ddconfig), "decoder": Decoder(**ddconfig),
                            "quantize": VectorQuantizer(64, 8, beta=0.25), "quant_conv": nn.Conv2d(8, 8, 1),
                            "post_quant_conv": nn.Conv2d(8, 8, 1)}).eval()
    taming.load_state_dict(ours.state_dict(), strict=True)

    images01 = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    z = taming["quant_conv"](taming["encoder"](images01 * 2 - 1))  # taming works on [-1, 1] images
    codes, loss, (_, _, indices) = taming["quantize"](z)
    decoded = taming["decoder"](taming["post_quant_conv"](codes))
    our_decoded, quantized = ours(images01)
    assert torch.equal(quantized.indices.flatten(), indices.flatten()) and indices.unique().numel() > 8
    assert torch.allclose(quantized.codes, codes, atol=1e-6)
    assert torch.allclose(our_decoded, decoded, atol=1e-5)
    # taming's quantizer loss: ||sg[z_q] - z||^2 + beta ||z_q - sg[z]||^2 (its "legacy" weighting)
    expected = quantized.commitment_loss + 0.25 * quantized.codebook_loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

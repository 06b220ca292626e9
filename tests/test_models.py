"""The masked autoencoder: masking, MAE's parameter layout and counts, safe weight loading."""

import math
import pickle

import pytest
import torch
from safetensors.torch import save_file

from robustmim.config import load_config
from robustmim.errors import UserError
from robustmim.pipeline.models.config import ModelConfig
from robustmim.pipeline.models.mae import MaskedAutoencoder, random_masking
from robustmim.pipeline.models.pos_embed import sincos_2d
from robustmim.pipeline.models.weights import load_weights

from helpers import tiny_model_config


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9, 0.33])
def test_masking_keeps_int_l_times_one_minus_r_and_restore_inverts(ratio):
    batch, length, dim = 6, 49, 8
    tokens = torch.randn(batch, length, dim)
    kept, mask, ids_restore = random_masking(tokens, torch.rand(batch, length), ratio)
    keep = int(length * (1 - ratio))
    assert kept.shape == (batch, keep, dim)
    assert torch.equal(mask.sum(dim=1), torch.full((batch,), float(length - keep)))
    for b in range(batch):  # the kept tokens are exactly the visible (mask 0) positions
        visible = tokens[b][mask[b] == 0]
        assert torch.equal(torch.sort(kept[b], dim=0).values, torch.sort(visible, dim=0).values)
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    shuffled = torch.gather(tokens, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, dim))
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
    assert torch.equal(restored, tokens)


def test_forward_shapes_and_no_masking_path():
    model = MaskedAutoencoder(tiny_model_config())
    images = torch.randn(3, 1, 28, 28)
    masked = model(images, torch.rand(3, 49), 0.75)
    assert masked.pred.shape == (3, 49, 16) and masked.latent.shape == (3, 1 + 12, 192)
    full = model(images)
    assert full.latent.shape == (3, 50, 192) and full.mask.sum() == 0
    assert torch.equal(model.unpatchify(model.patchify(images)), images)
    assert all(block.attn.fused_attn for block in model.blocks)  # scaled-dot-product attention


@pytest.mark.parametrize("encoder, decoder, expected_encoder, expected_total", [
    ("vit_base_patch16", "mae", 85.80e6, 111.91e6),
    ("vit_large_patch16", "mae", 303.30e6, 329.54e6),  # MAE-L: 304M encoder with timm's 1M head
    ("vit_huge_patch14", "mae", 630.76e6, 657.07e6),
    ("vit_large_patch16", "mimir", 303.30e6, 303.30e6 + 0.53e6),
])
def test_parameter_counts_on_the_meta_device(encoder, decoder, expected_encoder, expected_total):
    with torch.device("meta"):
        model = MaskedAutoencoder(load_config(ModelConfig, None, [f"encoder={encoder}", f"decoder={decoder}"]))
    assert next(model.parameters()).is_meta
    encoder_count = sum(p.numel() for _, p in model.encoder_named_parameters())
    total = sum(p.numel() for p in model.parameters())
    assert encoder_count == pytest.approx(expected_encoder, rel=1e-4)
    assert total == pytest.approx(expected_total, rel=2e-3)


def mae_official_keys(depth: int, decoder_depth: int) -> set[str]:
    """The parameter names of facebookresearch/mae's MaskedAutoencoderViT, written out."""
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias", "mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias",
            "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in block}
    keys |= {f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in block}
    return keys


def maes_sincos_2d(dim, grid):
    """MAE's get_2d_sincos_pos_embed written out element by element with the C library's sin and
    cos: the grid's first axis is w, the first half of the channels encodes it."""
    def encode(channels, position):
        omega = [1.0 / 10000 ** (i / (channels / 2.0)) for i in range(channels // 2)]
        return [math.sin(position * w) for w in omega] + [math.cos(position * w) for w in omega]
    rows = [[0.0] * dim]  # the CLS slot
    for h in range(grid):
        for w in range(grid):
            rows.append(encode(dim // 2, w) + encode(dim // 2, h))
    return torch.tensor(rows, dtype=torch.float64).float()


@pytest.mark.parametrize("dim,grid", [(192, 7), (1024, 14)])
def test_the_fixed_position_embedding_is_maes_sincos_to_the_last_bit(dim, grid):
    """Bit for bit, not allclose: torch's vectorized float64 sin differed in the last bit between
    processes, which made identical from-scratch launches diverge."""
    assert torch.equal(sincos_2d(dim, grid), maes_sincos_2d(dim, grid))


def test_state_dict_has_the_mae_layout_and_shapes():
    with torch.device("meta"):
        model = MaskedAutoencoder(load_config(ModelConfig, None, ["encoder=vit_large_patch16"]))
    state = model.state_dict()
    assert set(state) == mae_official_keys(24, 8)
    shapes = {"pos_embed": (1, 197, 1024), "decoder_pos_embed": (1, 197, 512), "mask_token": (1, 1, 512),
              "patch_embed.proj.weight": (1024, 3, 16, 16), "decoder_pred.weight": (768, 512),
              "blocks.0.attn.qkv.weight": (3072, 1024), "decoder_embed.weight": (512, 1024)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_saved_state_dict_loads_back(tmp_path, suffix):
    source, target = MaskedAutoencoder(tiny_model_config()), MaskedAutoencoder(tiny_model_config())
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"model": source.state_dict()}, path)  # the official releases' nesting
    else:
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    report = load_weights(target, path, strict=True)
    assert not (report.missing or report.unexpected or report.mismatched)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_reports_missing_unexpected_and_mismatched_keys(tmp_path):
    state = MaskedAutoencoder(tiny_model_config()).state_dict()
    del state["decoder_pred.bias"]
    state["head.weight"] = torch.zeros(10, 192)
    state["mask_token"] = torch.zeros(1, 1, 64)
    torch.save(state, tmp_path / "w.pth")
    report = load_weights(MaskedAutoencoder(tiny_model_config()), tmp_path / "w.pth")
    assert report.missing == ["decoder_pred.bias"] and report.unexpected == ["head.weight"]
    assert report.mismatched == ["mask_token: (1, 1, 64) vs (1, 1, 128)"]
    with pytest.raises(UserError, match=r"1 missing: decoder_pred.bias; 1 unexpected: head.weight"):
        load_weights(MaskedAutoencoder(tiny_model_config()), tmp_path / "w.pth", strict=True)


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_arbitrary_pickle_is_refused(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(UserError, match="weights_only=True refuses"):
        load_weights(MaskedAutoencoder(tiny_model_config()), tmp_path / "evil.pth")


def test_mask_stays_float32_under_bf16_autocast():
    model = MaskedAutoencoder(tiny_model_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 1, 28, 28), torch.rand(2, 49), 0.75)
    assert out.pred.dtype == torch.bfloat16 and out.mask.dtype == torch.float32
    assert out.mask.sum() == 2 * 37


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = MaskedAutoencoder(tiny_model_config())
    checkpointed = MaskedAutoencoder(tiny_model_config())
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)
    images, noise = torch.randn(4, 1, 28, 28), torch.rand(4, 49)
    for model in (plain, checkpointed):
        model(images, noise, 0.75).pred.square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_a_truncated_safetensors_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from robustmim.pipeline.models.weights import read_state_dict

    path = tmp_path / "init.safetensors"
    save_file({"w": torch.zeros(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match=rf"{path}: not a readable safetensors file \(truncated or damaged\?\)"):
        read_state_dict(path)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_give_the_eager_loss_and_gradients(checkpointing):
    """`compile: true` (torch.compile per transformer block; the GPU default) on CPU: the same
    training step's loss and gradients as eager, within float tolerance (inductor fuses, so not
    bit for bit), also with activation checkpointing around the compiled blocks."""
    from robustmim.pipeline.models.vit import compile_blocks
    from robustmim.pipeline.randomness import step_generator
    from robustmim.pipeline.objectives.config import ObjectiveConfig
    from robustmim.pipeline.objectives.registry import build_objective

    torch.manual_seed(0)
    eager = MaskedAutoencoder(tiny_model_config())
    compiled = MaskedAutoencoder(tiny_model_config())
    compiled.load_state_dict(eager.state_dict())
    assert compile_blocks(compiled) == 4 + 2  # encoder and decoder blocks
    for model in (eager, compiled):
        model.set_grad_checkpointing(checkpointing)
    objective = build_objective(load_config(ObjectiveConfig, None, ["name=dmae"]))
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (eager, compiled):
        out = objective(model, images, step_generator(0, 0, 0, "cpu"))
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name

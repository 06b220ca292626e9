"""LPIPS, the tokenizer's optional perceptual term: the published layout, the `lpips` package's
distances, weights from the files users have, and the term wired into tokenizer training."""

import dataclasses
import pickle

import pytest
import torch
from safetensors.torch import save_file

from robustmim.errors import ConfigError, UserError
from robustmim.pipeline.dist import detect_env
from robustmim.pipeline.flops import lpips_flops
from robustmim.pipeline.models.lpips import LPIPS, load_lpips
from robustmim.pipeline.models.weights import read_state_dict
from robustmim.pipeline.tokenizer.task import TokenizerModule, TokenizerTask

from helpers import tiny_tokenizer_config



def published_lpips_shapes() -> dict[str, tuple[int, ...]]:
    """taming's / the lpips package's LPIPS(net='vgg') state, written out from the paper's
    architecture: torchvision's VGG16 conv indices per stage (relu1_2 ... relu5_3), one 1x1
    head per stage, the two input-scaling vectors."""
    stages = {1: [(0, 3, 64), (2, 64, 64)], 2: [(5, 64, 128), (7, 128, 128)],
              3: [(10, 128, 256), (12, 256, 256), (14, 256, 256)],
              4: [(17, 256, 512), (19, 512, 512), (21, 512, 512)], 5: [(24, 512, 512), (26, 512, 512), (28, 512, 512)]}
    shapes = {"scaling_layer.shift": (1, 3, 1, 1), "scaling_layer.scale": (1, 3, 1, 1)}
    for stage, convs in stages.items():
        for index, cin, cout in convs:
            shapes[f"net.slice{stage}.{index}.weight"] = (cout, cin, 3, 3)
            shapes[f"net.slice{stage}.{index}.bias"] = (cout,)
    for head, channels in enumerate((64, 128, 256, 512, 512)):
        shapes[f"lin{head}.model.1.weight"] = (1, channels, 1, 1)
    return shapes


def test_the_network_has_the_published_layout():
    assert {k: tuple(v.shape) for k, v in LPIPS().state_dict().items()} == published_lpips_shapes()


def reference_lpips(ours: LPIPS):
    """The `lpips` package's network (its published heads, random VGG) given our VGG weights."""
    import lpips

    from robustmim.pipeline.timm_import import timm  # noqa: F401  (lpips imports torchvision)

    reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    reference.net.load_state_dict(ours.net.state_dict())
    return reference


@pytest.mark.filterwarnings("ignore:.*deprecated since 0.13:UserWarning")  # lpips calls vgg16(pretrained=...)
def test_distances_equal_the_lpips_package_for_rgb_and_grey_images(lpips_weights):
    ours = load_lpips(lpips_weights)
    reference = reference_lpips(ours)
    assert all(torch.equal(getattr(reference, f"lin{k}").model[1].weight, getattr(ours, f"lin{k}").model[1].weight)
               for k in range(5))  # the published heads loaded from the same vgg.pth
    generator = torch.Generator().manual_seed(0)
    for channels, size in ((3, 64), (1, 28)):
        first, second = (torch.rand(4, channels, size, size, generator=generator) * 2 - 1 for _ in range(2))
        expected = reference(first.expand(-1, 3, -1, -1), second.expand(-1, 3, -1, -1)).flatten()
        assert torch.allclose(ours(first, second), expected, rtol=1e-4, atol=1e-6)
        assert torch.all(ours(first, second) > 0) and torch.allclose(ours(first, first), torch.zeros(4))


def test_a_taming_checkpoint_supplies_the_same_network(tmp_path, lpips_weights):
    """taming's VQGAN checkpoints carry a complete LPIPS under loss.perceptual_loss.*, beside
    the VQGAN and the discriminator, in Lightning's {"state_dict": ...}."""
    split = load_lpips(lpips_weights)
    state = {f"loss.perceptual_loss.{k}": v for k, v in split.state_dict().items()}
    state.update({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "loss.discriminator.main.0.weight":
                  torch.zeros(64, 3, 4, 4)})
    torch.save({"state_dict": state, "global_step": 10}, tmp_path / "last.ckpt")
    from_checkpoint = load_lpips([tmp_path / "last.ckpt"])
    images = torch.rand(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(from_checkpoint(*images), split(*images))


def test_bad_lpips_weights_are_named(tmp_path, lpips_weights):
    vgg, heads = lpips_weights
    with pytest.raises(UserError, match=r"5 missing: lin0.model.1.weight"):
        load_lpips([vgg])
    with pytest.raises(UserError, match=r"26 missing: net.slice1.0.bias"):
        load_lpips([heads])
    with pytest.raises(UserError, match=rf"lin0.model.1.weight is in both {heads} and .*copy.safetensors"):
        save_file(read_state_dict(heads), tmp_path / "copy.safetensors")
        load_lpips([vgg, heads, tmp_path / "copy.safetensors"])
    wrong = read_state_dict(heads) | {"lin4.model.1.weight": torch.ones(1, 256, 1, 1)}
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(UserError, match=r"mismatched: lin4.model.1.weight: \(1, 256, 1, 1\) vs \(1, 512, 1, 1\)"):
        load_lpips([vgg, tmp_path / "wrong.safetensors"])
    save_file({k: -v for k, v in read_state_dict(heads).items()}, tmp_path / "negative.safetensors")
    with pytest.raises(UserError, match="negative entries"):
        load_lpips([vgg, tmp_path / "negative.safetensors"])
    with open(tmp_path / "pickle.pth", "wb") as f:
        pickle.dump({"lin0": object()}, f, protocol=2)
    with pytest.raises(UserError, match="pickle.pth: not loadable as plain weights"):
        load_lpips([vgg, tmp_path / "pickle.pth"])
    with pytest.raises(ConfigError, match="loss.perceptual_weight > 0 needs loss.perceptual_weights"):
        tiny_tokenizer_config(**{"loss.perceptual_weight": 1.0})
    with pytest.raises(ConfigError, match=r"needs data.image_size >= 16 \(got 12\)"):
        tiny_tokenizer_config(**{"loss.perceptual_weight": 1.0, "loss.perceptual_weights": f"[{heads}]",
                                 "data.image_size": 12})
    with pytest.raises(ConfigError, match="adaptive_adversarial_weight scales the GAN term"):
        tiny_tokenizer_config(**{"loss.adaptive_adversarial_weight": True})


def perceptual_module(lpips_weights, **loss) -> TokenizerModule:
    weights = f"[{','.join(map(str, lpips_weights))}]"
    cfg = tiny_tokenizer_config(**{"loss.perceptual_weight": 1.0, "loss.perceptual_weights": weights,
                         **{f"loss.{k}": v for k, v in loss.items()}})
    torch.manual_seed(0)
    return TokenizerTask(cfg, detect_env(), torch.device("cpu")).build()


def test_the_perceptual_term_trains_the_vqgan_and_leaves_lpips_frozen(lpips_weights):
    module = perceptual_module(lpips_weights)
    module.train()
    assert not module.perceptual.training and not any(p.requires_grad for p in module.perceptual.parameters())
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    loss, metrics = module(images, torch.zeros(4, dtype=torch.long), torch.Generator())
    with torch.no_grad():
        decoded, quantized = module.model(images)
        expected_perceptual = float(module.perceptual(images * 2 - 1, decoded).mean())
        expected_rest = float(metrics["reconstruction"] + quantized.codebook_loss + 0.25 * quantized.commitment_loss)
    assert float(metrics["perceptual"]) == pytest.approx(expected_perceptual, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(expected_rest + expected_perceptual, rel=1e-5)
    loss.backward()
    assert module.model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.perceptual.parameters())
    plain = tiny_tokenizer_config()

    def flops(cfg):
        return TokenizerTask(cfg, detect_env(), torch.device("cpu")).flops_per_image()

    assert flops(dataclasses.replace(plain, loss=module.loss_cfg)) == pytest.approx(flops(plain) + lpips_flops(1, 28))


def test_the_adaptive_gan_weight_balances_the_two_gradients_at_the_last_layer(lpips_weights):
    """taming's d_weight = ||grad nll|| / (||grad gan|| + 1e-4) at decoder.conv_out.weight."""
    module = perceptual_module(lpips_weights, adversarial_weight=0.5, adaptive_adversarial_weight=True)
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    loss, metrics = module(images, torch.zeros(4, dtype=torch.long), torch.Generator())
    decoded, _ = module.model(images)
    last = module.model.decoder.conv_out.weight
    nll = (decoded - (images * 2 - 1)).abs().mean() + module.perceptual(images * 2 - 1, decoded).mean()
    gan = -module.discriminator(decoded).mean()
    nll_norm = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    ratio = nll_norm / (torch.autograd.grad(gan, last)[0].norm() + 1e-4)
    assert float(metrics["adversarial_factor"]) == pytest.approx(0.5 * float(ratio), rel=1e-4)
    loss.backward()  # the factor's own gradients were taken without touching .grad
    assert all(p.grad is not None for p in module.model.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="adaptive_adversarial_weight needs zero_stage <= 2"):
        tiny_tokenizer_config(**{"loss.adversarial_weight": 0.5, "loss.adaptive_adversarial_weight": True,
                                 "zero_stage": 3})

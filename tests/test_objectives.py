"""The four pretraining objectives: what each loss covers, where noise goes, MIMIR, nHSIC, training."""

import math

import pytest
import torch

from robustmim.config import load_config
from robustmim.errors import ConfigError
from robustmim.pipeline.data.config import LoaderConfig
from robustmim.pipeline.data.dali import DaliLoader
from robustmim.pipeline.models.mae import MaskedAutoencoder
from robustmim.pipeline.objectives.config import ObjectiveConfig
from robustmim.pipeline.objectives.hsic import nhsic
from robustmim.pipeline.objectives.mimir import MIMIR
from robustmim.pipeline.objectives.nim import NIM
from robustmim.pipeline.objectives.registry import build_objective
from robustmim.pipeline.randomness import step_generator

from helpers import tiny_model_config



def objective(name, *overrides):
    return build_objective(load_config(ObjectiveConfig, None, [f"name={name}", *overrides]))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MaskedAutoencoder(tiny_model_config())


@pytest.fixture
def images():
    return torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _capture(module, kind):
    """Record a submodule's last output (or input) during a forward pass."""
    seen = {}
    if kind == "output":
        handle = module.register_forward_hook(lambda m, args, out: seen.__setitem__("value", out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: seen.__setitem__("value", args[0]))
    return seen, handle


@pytest.mark.parametrize("name, covered", [("mae", "masked"), ("dmae", "all"), ("nim", "all"), ("mimir", "masked")])
def test_loss_covers_exactly_the_patches_each_objective_says(model, images, name, covered):
    seen, handle = _capture(model.decoder_pred, "output")
    masks = {}
    mask_hook = model.register_forward_hook(lambda m, args, out: masks.__setitem__("mask", out.mask))
    out = objective(name)(model, images, step_generator(0, 0, 0, "cpu"))
    handle.remove(), mask_hook.remove()
    grad, = torch.autograd.grad(out.loss, seen["value"])  # the last decoder pass: the loss's own
    touched = (grad[:, 1:, :].abs().sum(dim=-1) > 0).float()  # [B, L]; slot 0 is the dropped CLS
    mask = masks["mask"]
    if covered == "masked":
        assert mask.sum() == 8 * (49 - 12)
        assert torch.equal(touched, mask)
    else:
        assert touched.sum() == 8 * 49
    if name == "nim":
        assert mask.sum() == 0  # no masking by default


def test_dmae_adds_noise_in_pixel_space_before_normalization(model, images):
    seen, handle = _capture(model.patch_embed, "input")
    objective("dmae")(model, images, step_generator(3, 7, 1, "cpu"))
    handle.remove()
    noise = torch.randn(images.shape, generator=step_generator(3, 7, 1, "cpu"))  # the objective's first draw
    assert torch.allclose(seen["value"], model.normalize(images + 0.25 * noise), atol=1e-6)
    assert not torch.allclose(seen["value"], model.normalize(images) + 0.25 * noise, atol=1e-3)
    assert seen["value"].max() > model.normalize(torch.ones(1)).item()  # not clipped to [0, 1]


def test_nim_noise_per_image_in_pixel_space(model, images):
    seen, handle = _capture(model.patch_embed, "input")
    nim = objective("nim", "nim.sigma_dist=fixed", "nim.fixed_sigma=51")
    assert nim(model, images, step_generator(0, 0, 0, "cpu")).denoised is None  # training: not computed
    out = nim(model, images, step_generator(0, 0, 0, "cpu"), with_denoised=True)
    handle.remove()
    g = step_generator(0, 0, 0, "cpu")
    noise = torch.randn(images.shape, generator=g)
    assert torch.allclose(seen["value"], model.normalize(images + 0.2 * noise), atol=1e-6)  # 51/255 = 0.2
    assert out.denoised.shape == images.shape and torch.isfinite(out.denoised).all()
    assert out.metrics["sigma_mean"] == pytest.approx(51.0)


@pytest.mark.parametrize("overrides, mean, var", [
    ([], 75.0, 225.0),  # Gamma(25, scale 3): mean 75, variance 25 * 9
    (["nim.gamma_shape=0.5", "nim.gamma_scale=4"], 2.0, 8.0),
    (["nim.sigma_dist=uniform", "nim.uniform_low=10", "nim.uniform_high=40"], 25.0, 30**2 / 12),
    (["nim.sigma_dist=fixed", "nim.fixed_sigma=30"], 30.0, 0.0),
])
def test_sigma_samples_have_the_distributions_mean_and_variance(overrides, mean, var):
    nim: NIM = objective("nim", *overrides)
    sigma = nim.sample_sigma(400_000, step_generator(0, 0, 0, "cpu"), "cpu").double()
    assert sigma.mean().item() == pytest.approx(mean, rel=0.01)
    assert sigma.var().item() == pytest.approx(var, rel=0.02, abs=1e-9)
    assert (sigma >= 0).all()


def test_mimir_perturbation_stays_in_the_ball_and_raises_the_loss(model, images):
    mimir: MIMIR = objective("mimir")
    adv = mimir.perturb(model, images, step_generator(0, 0, 0, "cpu"))
    assert (adv - images).abs().max() <= 8 / 255 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1 and not torch.equal(adv, images)
    gains = []
    for seed in range(5):  # the same mask for both, so only the input differs
        clean = mimir.self_reconstruction_loss(model, images, step_generator(seed, 1, 0, "cpu"))
        attacked = mimir.self_reconstruction_loss(model, adv, step_generator(seed, 1, 0, "cpu"))
        gains.append((attacked - clean).item())
    assert min(gains) > 0


def test_mimir_total_loss_includes_the_weighted_nhsic(model, images):
    out = objective("mimir", "mimir.hsic_weight=0.5")(model, images, step_generator(0, 0, 0, "cpu"))
    m = out.metrics
    assert m["nhsic"] > 0
    assert out.loss.item() == pytest.approx((m["reconstruction"] + 0.5 * m["nhsic"]).item(), rel=1e-5)


def direct_nhsic(z, x, sigma, eps):
    """nHSIC_CCA computed entry by entry: the O(n^2) loops of its definition."""
    m = z.shape[0]

    def centered_kernel(a):
        a = a.double().flatten(1)
        d = a.shape[1]
        k = torch.tensor([[math.exp(-float(((a[i] - a[j]) ** 2).sum()) / (2 * sigma**2 * d))
                           for j in range(m)] for i in range(m)], dtype=torch.float64)
        h = torch.eye(m, dtype=torch.float64) - 1.0 / m
        return k @ h

    def resolvent(k):
        return k @ torch.linalg.inv(k + eps * m * torch.eye(m, dtype=torch.float64))

    r_z, r_x = resolvent(centered_kernel(z)), resolvent(centered_kernel(x))
    return sum(float(r_z[i, j] * r_x[j, i]) for i in range(m) for j in range(m))


def test_nhsic_matches_the_direct_computation():
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(24, 3, 5, generator=g), torch.randn(24, 2, 4, 4, generator=g)
    x[:, 0, 0, 0] += 3 * z[:, 0, 0]  # some dependence
    for sigma, eps in [(5.0, 1e-5), (1.0, 1e-3)]:
        assert nhsic(z, x, sigma, eps).item() == pytest.approx(direct_nhsic(z, x, sigma, eps), rel=1e-3)


def float64_nhsic(z, x, sigma=5.0, eps=1e-5):
    """nHSIC in float64 from its matrix definition (explicit H and inverse), differentiable."""
    def resolvent(a):
        a = a.double().flatten(1)
        m, d = a.shape
        k = torch.exp(-torch.cdist(a, a) ** 2 / (2 * sigma**2 * d)) @ (torch.eye(m, dtype=torch.float64) - 1.0 / m)
        return k @ torch.linalg.inv(k + eps * m * torch.eye(m, dtype=torch.float64))

    return (resolvent(z) * resolvent(x).T).sum()


def test_nhsic_stays_fp32_under_bf16_autocast():
    """Measured when written: under bf16 autocast the Gram matmul in bf16 put the value 7e-4 and
    the gradients 7% (max abs error over max abs) from float64; in fp32, 2e-8 and 0.8%."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 28, 28, generator=g)  # a micro-batch of images and a latent that depends on them
    z = (x.flatten(1) @ (torch.randn(784, 17 * 64, generator=g) / 28)).reshape(32, 17, 64)
    z64, x64 = z.double().requires_grad_(), x.double().requires_grad_()
    reference = float64_nhsic(z64, x64)
    reference.backward()
    z32, x32 = z.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = nhsic(z32, x32)
    value.backward()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    for ours, exact in ((z32.grad, z64.grad), (x32.grad, x64.grad)):
        assert ((ours - exact).abs().max() / exact.abs().max()).item() < 0.02


def test_nhsic_of_a_singular_system_is_zero_with_a_zero_gradient():
    """Identical latents make K~ = 0; a ridge that underflows in fp32 leaves A = 0, singular. The
    term is skipped (0), and the backward pass must not carry the failed solve's NaN."""
    z = torch.ones(8, 4, requires_grad=True)
    x = torch.rand(8, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    value = nhsic(z, x, eps=1e-50)
    (3 * value).backward()
    assert value.item() == 0.0
    assert torch.equal(z.grad, torch.zeros_like(z)) and torch.equal(x.grad, torch.zeros_like(x))
    healthy = nhsic(z.detach() + torch.rand(8, 4), x.detach())  # the same call, invertible: not skipped
    assert healthy.item() > 0
    with pytest.raises(ValueError, match="eps > 0"):
        nhsic(z, x, eps=0.0)
    with pytest.raises(ConfigError, match="mimir.hsic_eps"):
        objective("mimir", "mimir.hsic_eps=0")


def test_nhsic_is_near_zero_for_independent_inputs():
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(128, 1, generator=g), torch.randn(128, 1, generator=g)
    independent, dependent = nhsic(z, x).item(), nhsic(z, z**2).item()
    assert independent < 0.1 and dependent > 10 * independent


def test_same_generator_seed_same_loss(model, images):
    for name in ("mae", "nim", "dmae", "mimir"):
        a = objective(name)(model, images, step_generator(5, 2, 0, "cpu")).loss
        b = objective(name)(model, images, step_generator(5, 2, 0, "cpu")).loss
        c = objective(name)(model, images, step_generator(5, 2, 1, "cpu")).loss
        assert a.item() == b.item() and a.item() != c.item()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mae", "nim", "dmae", "mimir"])
def test_tiny_model_loss_falls_over_50_cpu_steps_on_fashion_mnist(fashion_val_shards, name):
    torch.manual_seed(0)
    model = MaskedAutoencoder(tiny_model_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    loader = DaliLoader(load_config(LoaderConfig, None, [
        f"shards={fashion_val_shards}", "split=val", "batch_size=64", "image_size=28", "channels=1",
        "num_threads=2", "shuffle_buffer=512"]))
    obj = objective(name)
    key = "reconstruction" if name == "mimir" else "loss"
    losses = []
    for step in range(50):
        out = obj(model, next(loader).images, step_generator(0, step, 0, "cpu"))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.metrics[key].item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"{name}: mean loss of steps 1-5 {first:.3f} -> steps 46-50 {last:.3f}")
    assert last < 0.75 * first, f"{name}: {first:.3f} -> {last:.3f}"


def test_pretraining_warns_when_mimirs_micro_batch_is_far_below_its_runs():
    from robustmim.pipeline.pretrain.config import PretrainConfig
    from robustmim.pipeline.pretrain.task import mimir_micro_batch_warning

    tiny = mimir_micro_batch_warning(load_config(PretrainConfig, "configs/pretrain/mimir_tiny_fmnist.yaml", []))
    assert "nHSIC" in tiny and "micro_batch 64" in tiny
    for config in ("configs/pretrain/mimir_vitl_in1k.yaml", "configs/pretrain/mae_tiny_fmnist.yaml"):
        assert mimir_micro_batch_warning(load_config(PretrainConfig, config, [])) is None


def test_mimir_configs_train_on_raw_pixels_as_mimirs_code():
    """With the ImageNet MIMIR config's model section (shrunk to a tiny encoder) our MIMIR loss on RGB
    images equals the loss written directly in [0, 1] space: the encoder sees the raw attacked
    pixels, the target is MAE's per-patch normalization of the raw clean pixels."""
    import dataclasses

    from robustmim.pipeline.pretrain.config import PretrainConfig
    from robustmim.pipeline.models.config import IMAGENET_MEAN, IMAGENET_STD
    from robustmim.pipeline.objectives.base import mask_noise, pixel_target

    cfg = load_config(PretrainConfig, "configs/pretrain/mimir_vitl_in1k.yaml",
                      ["model.encoder=vit_tiny_patch4", "model.decoder=tiny", "model.img_size=32",
                       "data.image_size=32"])
    torch.manual_seed(0)
    model = MaskedAutoencoder(cfg.model)
    mimir = build_objective(cfg.objective)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    seen, handle = _capture(model.patch_embed, "input")
    out = mimir(model, images, step_generator(0, 0, 0, "cpu"))
    handle.remove()

    g = step_generator(0, 0, 0, "cpu")  # the objective's draws, in its order: attack, then mask
    adv = mimir.perturb(model, images, g)
    direct = model(adv, mask_noise(images, model, g), 0.75)  # raw pixels in, no normalization anywhere
    patches = torch.einsum("nchpwq->nhwpqc", images.reshape(8, 3, 8, 4, 8, 4)).reshape(8, 64, 48)
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((direct.pred - target) ** 2).mean(-1)
    expected = (per_patch * direct.mask).sum() / direct.mask.sum() + 1e-5 * nhsic(direct.latent, adv)
    assert torch.equal(seen["value"], adv)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)

    imagenet = MaskedAutoencoder(dataclasses.replace(cfg.model, pixel_mean=list(IMAGENET_MEAN),
                                                     pixel_std=list(IMAGENET_STD)))
    assert ((pixel_target(imagenet, images, True) - target) ** 2).mean() > 0.01  # the convention matters

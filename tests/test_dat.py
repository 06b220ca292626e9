"""DAT's step: the L2 perturbation around the VQGAN reconstruction, re-quantized into other codes."""

import dataclasses
import platform
import re
from pathlib import Path

import pytest
import torch

from robustmim.config import load_config
from robustmim.pipeline.engine.config import Precision, cpu_computes_bf16, uses_bf16
from robustmim.pipeline.finetune.config import FinetuneConfig
from robustmim.pipeline.finetune.mixing import smooth_one_hot
from robustmim.pipeline.finetune.recipes import DiscreteAdversarial, build_recipe
from robustmim.pipeline.finetune.task import FinetuneModule
from robustmim.pipeline.models.classifier import ViTClassifier
from robustmim.pipeline.models.vqgan import reconstruct

from helpers import val_images


@pytest.fixture(scope="module")
def dat_parts(tiny_tokenizer, fashion_shards):
    cfg = load_config(FinetuneConfig, "configs/finetune/dat_tiny_fmnist.yaml",
                      ["out_dir=x", "init=", f"recipe.dat.tokenizer={tiny_tokenizer}", "model.num_classes=10"])
    torch.manual_seed(0)
    module = FinetuneModule(ViTClassifier(cfg.model), build_recipe(cfg.recipe, 10))
    images = val_images(fashion_shards, every_nth=100)[:64]
    return cfg, module, images


def perturb(module, images, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    targets = smooth_one_hot(torch.arange(images.shape[0]) % 10, 10, 0.1)
    with torch.no_grad():
        quantized = reconstruct(module.recipe.tokenizer, images)
    torch.manual_seed(seed)  # drop path (train mode, as DAT attacks) draws from the global RNG
    return quantized, module.recipe.perturb(module.model, quantized, targets, torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_the_perturbation_stays_within_epsilon_and_flips_some_codes(dat_parts):
    cfg, module, images = dat_parts
    assert isinstance(module.recipe, DiscreteAdversarial) and cfg.recipe.dat.epsilon == 0.1
    quantized, perturbed = perturb(module, images, seed=0)
    distance = (perturbed - quantized).flatten(1).norm(dim=1)
    assert distance.max() <= 0.1 + 1e-5 and perturbed.min() >= 0 and perturbed.max() <= 1
    assert distance.min() > 0.05  # a full step of 0.1: on or near the sphere (clipping to [0, 1] aside)
    with torch.no_grad():
        tokenizer = module.recipe.tokenizer
        before, after = tokenizer.token_indices(quantized), tokenizer.token_indices(perturbed)
    flipped = (before != after).float().mean().item()
    assert 0 < flipped < 0.5, flipped  # some visual words change, most stay
    assert not any(p.grad is not None for p in module.model.parameters())  # input gradients only
    _, again = perturb(module, images, seed=0)
    assert torch.equal(again, perturbed)  # every other draw from the step's generator


def test_the_training_loss_is_clean_plus_discrete_adversarial_cross_entropy(dat_parts):
    cfg, module, images = dat_parts
    labels = torch.arange(images.shape[0]) % 10
    loss, metrics = module(images, labels, torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx((metrics["clean"] + metrics["adversarial"]).item(), rel=1e-6)
    loss.backward()
    assert module.model.head.weight.grad is not None
    assert all(p.grad is None for p in module.recipe.tokenizer.parameters())  # frozen
    assert all(not key.startswith("recipe") for key in module.state_dict())  # not in checkpoints


def test_the_bf16_tokenizer_option_discretizes_as_fp32_does_within_bf16_rounding(dat_parts):
    cfg, module, images = dat_parts

    def discretize(precision):
        dat = dataclasses.replace(cfg.recipe.dat, tokenizer_precision=Precision(precision))
        recipe = DiscreteAdversarial(dataclasses.replace(cfg.recipe, dat=dat), 10, module.recipe.tokenizer)
        return recipe.discretize(images)

    fp32 = discretize("auto")  # as the step: fp32 here
    bf16 = discretize("bf16")
    assert bf16.dtype == images.dtype == torch.float32 and not torch.equal(bf16, fp32)  # it ran in bf16
    assert (bf16 - fp32).abs().mean() < 0.01, (bf16 - fp32).abs().mean()
    # bf16_native: bf16 on a CPU with bf16 instructions, as the step (fp32) on one without
    assert torch.equal(discretize("bf16_native"), bf16 if cpu_computes_bf16() else fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 training step (GPUs)
        assert torch.equal(discretize("auto"), bf16)  # auto: as the step
        assert torch.equal(discretize("fp32"), fp32)  # fp32: out of the step's autocast
    with pytest.raises(ValueError, match="bf16_weights is a training mode"):
        dataclasses.replace(cfg.recipe.dat, tokenizer_precision=Precision.bf16_weights)


def test_bf16_native_follows_the_cpu_s_own_flags():
    """torch's runtime detection against the kernel's view of the same CPU (/proc/cpuinfo)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and platform.machine() == "x86_64":  # the machines robustmim's CI runs on
        flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.M).group(1).split())
        assert cpu_computes_bf16() == bool(flags & {"amx_bf16", "avx512_bf16"})
    assert uses_bf16(Precision.bf16_native, on_gpu=False) == cpu_computes_bf16()
    assert uses_bf16(Precision.bf16_native, on_gpu=True) and not uses_bf16(Precision.auto, on_gpu=False)

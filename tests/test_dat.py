"""DAT's step: the L2 perturbation around the VQGAN reconstruction, re-quantized into other codes."""

import dataclasses

import pytest
import torch

from robustmim.config import load_config
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.mixing import smooth_one_hot
from pipeline.finetune.recipes import DiscreteAdversarial, build_recipe
from pipeline.finetune.task import FinetuneModule
from pipeline.models.classifier import ViTClassifier
from pipeline.models.vqgan import reconstruct
from pipeline.tokenizer.export import load_tokenizer

from helpers import val_images


@pytest.fixture(scope="module")
def dat_parts(tiny_tokenizer, fashion_shards):
    cfg = load_config(FinetuneConfig, "configs/finetune/dat_tiny_fmnist.yaml",
                      ["out_dir=x", "init=", f"recipe.dat.tokenizer={tiny_tokenizer}", "model.num_classes=10"])
    torch.manual_seed(0)
    module = FinetuneModule(ViTClassifier(cfg.model), build_recipe(cfg.recipe, 10),
                            tokenizer=load_tokenizer(tiny_tokenizer))
    images = val_images(fashion_shards, every_nth=100)[:64]
    return cfg, module, images


def perturb(module, images, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    targets = smooth_one_hot(torch.arange(images.shape[0]) % 10, 10, 0.1)
    with torch.no_grad():
        quantized = reconstruct(module.tokenizer, images)
    torch.manual_seed(seed)  # drop path (train mode, as DAT attacks) draws from the global RNG
    return quantized, module.recipe.perturb(module, quantized, targets, torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_the_perturbation_stays_within_epsilon_and_flips_some_codes(dat_parts):
    cfg, module, images = dat_parts
    assert isinstance(module.recipe, DiscreteAdversarial) and cfg.recipe.dat.epsilon == 0.1
    quantized, perturbed = perturb(module, images, seed=0)
    distance = (perturbed - quantized).flatten(1).norm(dim=1)
    assert distance.max() <= 0.1 + 1e-5 and perturbed.min() >= 0 and perturbed.max() <= 1
    assert distance.min() > 0.05  # a full step of 0.1: on or near the sphere (clipping to [0, 1] aside)
    with torch.no_grad():
        before, after = module.tokenizer.token_indices(quantized), module.tokenizer.token_indices(perturbed)
    flipped = (before != after).float().mean().item()
    assert 0 < flipped < 0.5, flipped  # some visual words change, most stay
    assert not any(p.grad is not None for p in module.model.parameters())  # input gradients only
    _, again = perturb(module, images, seed=0)
    assert torch.equal(again, perturbed)  # every other draw from the step's generator


def test_the_training_loss_is_clean_plus_discrete_adversarial_cross_entropy(dat_parts):
    cfg, module, images = dat_parts
    labels = torch.arange(images.shape[0]) % 10
    loss, metrics = module.recipe(module, images, labels, torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx((metrics["clean"] + metrics["adversarial"]).item(), rel=1e-6)
    loss.backward()
    assert module.model.head.weight.grad is not None
    assert all(p.grad is None for p in module.tokenizer.parameters())  # frozen


def test_the_bf16_tokenizer_option_discretizes_as_fp32_does_within_bf16_rounding(dat_parts):
    cfg, module, images = dat_parts
    fp32 = module.recipe.discretize(module, images)
    dat = dataclasses.replace(cfg.recipe.dat, tokenizer_bf16=True)
    bf16 = build_recipe(dataclasses.replace(cfg.recipe, dat=dat), 10).discretize(module, images)
    assert bf16.dtype == images.dtype == torch.float32 and not torch.equal(bf16, fp32)  # it ran in bf16
    assert (bf16 - fp32).abs().mean() < 0.01, (bf16 - fp32).abs().mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the engine's autocast (GPUs): left on when the option is off
        inside = module.recipe.discretize(module, images)
    assert not torch.equal(inside, fp32)

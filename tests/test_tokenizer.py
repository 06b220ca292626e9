"""`robustmim tokenizer`: a VQGAN trained on the Fashion-MNIST shards, exported in taming's
layout, resumed exactly after a SIGKILL, and its optional GAN term wired to the right networks."""

import dataclasses
import json
import os
import signal

import pytest
import torch
import yaml

from robustmim.errors import UserError
from robustmim.pipeline.data.shardset import open_shards
from robustmim.pipeline.engine.checkpoint import LATEST
from robustmim.pipeline.engine.config import Precision, uses_bf16
from robustmim.pipeline.engine.metrics import read_metrics
from robustmim.pipeline.models.vqgan import VQGAN, reconstruct
from robustmim.pipeline.tokenizer.export import load_tokenizer
from robustmim.pipeline.tokenizer.task import TokenizerModule, TokenizerTask

from conftest import TOKENIZER_STEPS
from helpers import TOKENIZER_CONFIG, finish, run_stage, tiny_tokenizer_config, val_images, wait_for

def recon_mse(model: VQGAN, images: torch.Tensor, bf16: bool = False) -> float:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return float(torch.cat([(reconstruct(model, chunk) - chunk).pow(2).flatten(1).mean(1)
                                for chunk in images.split(250)]).mean())


# Measured (100 steps of 32, one rank): val MSE 0.023-0.03 in [0, 1] pixels against 0.16-0.2 for
# the untrained network; ~150-200 of 256 codes in use (perplexity ~100+).
def test_the_tiny_tokenizer_reconstructs_far_better_than_an_untrained_one(tiny_tokenizer, fashion_shards):
    out_dir = tiny_tokenizer.parent / "run"
    validation = [r for r in read_metrics(out_dir) if "val_recon_mse" in r]
    assert [r["step"] for r in validation] == [TOKENIZER_STEPS] and validation[0]["val_samples"] == 1000
    trained = load_tokenizer(tiny_tokenizer)
    assert not any(p.requires_grad for p in trained.parameters()) and not trained.training
    torch.manual_seed(0)
    untrained = VQGAN(trained.cfg).eval()
    images = val_images(fashion_shards, every_nth=10)
    ours, baseline = recon_mse(trained, images), recon_mse(untrained, images)
    # the export is what was validated, under the run's precision (bf16 on a CPU with bf16 instructions)
    precision = Precision(yaml.safe_load((out_dir / "config.yaml").read_text())["precision"])
    as_validated = recon_mse(trained, images, bf16=uses_bf16(precision, on_gpu=False))
    assert as_validated == pytest.approx(validation[0]["val_recon_mse"], rel=1e-4)
    assert ours < baseline / 4, (ours, baseline)
    assert validation[0]["val_perplexity"] > 20 and validation[0]["val_codes_used"] > 50, validation
    info = json.loads(tiny_tokenizer.with_suffix(".json").read_text())
    assert info["format"] == "robustmim-vqgan/1" and info["step"] == TOKENIZER_STEPS
    assert not [k for k in trained.state_dict() if k.startswith("discriminator")]


@pytest.mark.slow
def test_sigkill_then_resume_repeats_the_uninterrupted_run(tmp_path, fashion_shards, lpips_weights):
    """Every optional term on: LPIPS, and taming's adaptively weighted adversarial term, which
    switches on at step 6, after the checkpoint the resumed run starts from (step 4): the switch
    must come at the same step again. (One rank: the engine's resume on several ranks and ZeRO
    stages is tested in test_engine.py.)

    The runs use one CPU thread, as every rank under torchrun does: oneDNN's convolutions
    repeat bit for bit only at a fixed thread count, and a one-rank run otherwise takes what
    the machine offers (CI saw the first step's loss differ in the 7th digit)."""
    settings = {"data.shards": fashion_shards, "length.samples": 16 * 10, "global_batch": 16, "micro_batch": 16,
                "log_every": 1, "checkpoint.every_steps": 4, "validation.every_steps": 0,
                "loss.adversarial_weight": 0.5, "loss.adversarial_start_step": 6,
                "loss.adaptive_adversarial_weight": True, "loss.perceptual_weight": 1.0,
                "loss.perceptual_weights": f"[{','.join(map(str, lpips_weights))}]"}
    reference = tmp_path / "reference"
    one_thread = {"OMP_NUM_THREADS": "1"}
    finish(run_stage("tokenizer", TOKENIZER_CONFIG, {**settings, "out_dir": reference}, env=one_thread))
    out_dir = tmp_path / "run"
    proc = run_stage("tokenizer", TOKENIZER_CONFIG, {**settings, "out_dir": out_dir}, env=one_thread)
    wait_for(lambda: (out_dir / "checkpoints" / LATEST).is_file() and len(read_metrics(out_dir)) >= 5, proc,
             what="step 5")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out_dir / "checkpoints" / LATEST).read_text() == "step_00000004"
    finish(run_stage("tokenizer", TOKENIZER_CONFIG, {**settings, "out_dir": out_dir}, env=one_thread))

    def curve(run):
        return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run)]

    assert curve(out_dir) == curve(reference) and len(curve(reference)) == 10
    records = read_metrics(reference)
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in records])))
    assert all(r["perceptual"] > 0 and r["adversarial_factor"] > 0 for r in records)
    for r in records[:6]:  # the logged terms add up to the loss while the GAN is off
        assert r["loss"] == pytest.approx(r["reconstruction"] + r["perceptual"] + r["codebook"]
                                          + 0.25 * r["commitment"], rel=1e-6)


def test_the_gan_terms_train_each_network_only_on_its_own_loss():
    cfg = tiny_tokenizer_config(**{"loss.adversarial_weight": 0.1})
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    grads = {}
    for weight in (0.1, 10.0):
        torch.manual_seed(0)
        module = TokenizerModule(VQGAN(cfg.model), dataclasses.replace(cfg.loss, adversarial_weight=weight), 1)
        loss, metrics = module(images, torch.zeros(4, dtype=torch.long), torch.Generator())
        loss.backward()
        grads[weight] = ({n: p.grad.clone() for n, p in module.discriminator.named_parameters()},
                         module.model.decoder.conv_out.weight.grad.clone())
        assert int(module.micro_steps) == 1 and "discriminator" in metrics
    (disc_a, dec_a), (disc_b, dec_b) = grads[0.1], grads[10.0]
    assert all(torch.allclose(disc_a[n], disc_b[n]) for n in disc_a)  # the generator term leaves it alone
    assert not torch.allclose(dec_a, dec_b)  # ... and reaches the decoder


def test_bad_tokenizer_inputs_are_named(tmp_path, fashion_shards):
    shards = open_shards(fashion_shards, "train")
    with pytest.raises(UserError, match="differs from data.image_size=32"):
        TokenizerTask.resolve(tiny_tokenizer_config(**{"data.image_size": 32}), shards)
    with pytest.raises(UserError, match="the tokenizer takes 1-channel images, the data has 3"):
        TokenizerTask.resolve(tiny_tokenizer_config(**{"data.channels": 3}), shards)
    with pytest.raises(UserError, match="not a multiple of the tokenizer's downsampling factor 4"):
        TokenizerTask.resolve(tiny_tokenizer_config(**{"data.image_size": 30, "model.resolution": 30}), shards)
    with pytest.raises(UserError, match="missing; give a `robustmim export` of a tokenizer run"):
        load_tokenizer(tmp_path / "vqgan.ckpt")
    with pytest.raises(UserError, match="tokenizer preset 'f32' unknown"):
        load_tokenizer(tmp_path / "vqgan.ckpt", "f32")

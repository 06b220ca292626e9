"""The evaluation stage: PGD, APGD, CERTIFY / PREDICT against closed forms and scipy, exact
sharding across ranks, resume after a kill, strict merge, the report. (Array tasks merged
after a real Slurm array job: tests/test_slurm.py.)"""

import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file
from scipy.stats import binom, binomtest, norm

from robustmim.config import load_config
from robustmim.errors import UserError
from robustmim.pipeline.data.config import LoaderConfig
from robustmim.pipeline.data.dali import DaliLoader
from robustmim.pipeline.models.classifier import ViTClassifier
from robustmim.pipeline.models.deployed import DefenseKind, DeploymentSpec, deployed_model
from robustmim.eval.apgd import autoattack, checkpoints, dlr_untargeted
from robustmim.eval.attack_names import (attack_key, attack_label, attack_labels, autoattack_fields, pgd_fields,
                                         planned_attacks)
from robustmim.eval.attacks import pgd_attack
from robustmim.eval.certify import ABSTAIN, certify, clopper_pearson_lower, largest_certifiable_radius, predict
from robustmim.eval.config import AutoAttackConfig, PGDConfig
from robustmim.eval.model import EvalModel
from robustmim.eval.records import merge_records, rank_file

from conftest import REPO_ROOT
from helpers import ROBUSTMIM, finish, tiny_classifier_config, wait_for

TRAIN_STEPS = 150


def export_classifier(model: nn.Module, folder, name: str, defense: DefenseKind, sigma: float = 0.0):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f"{name}.safetensors"))
    spec = DeploymentSpec(method="standard", weights=f"{name}.safetensors", classifier=model.cfg, defense=defense,
                          sigma=sigma, trained={"init": "", "samples_seen": TRAIN_STEPS * 64, "step": TRAIN_STEPS})
    (folder / f"{name}.json").write_text(json.dumps(OmegaConf.to_container(OmegaConf.structured(spec),
                                                                           enum_to_str=True)))
    return folder / f"{name}.json"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fashion_shards):
    """A tiny ViT trained for 150 plain AdamW steps of 64 on Fashion-MNIST (in-process), exported
    as a plain classifier and as a smoothing base classifier (sigma 0.25)."""
    torch.manual_seed(0)
    data = load_config(LoaderConfig, None, [f"shards={fashion_shards}", "image_size=28", "channels=1", "batch_size=64",
                                            "num_threads=1", "shuffle_buffer=1024", "crop_scale=[1.0,1.0]"])
    loader = DaliLoader(data, 0, 1, 0, train=True)
    model = ViTClassifier(tiny_classifier_config(drop_path=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(TRAIN_STEPS):
        batch = next(loader)
        loss = F.cross_entropy(model(batch.images), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    folder = tmp_path_factory.mktemp("classifiers")
    return {"model": model, "plain": export_classifier(model, folder, "plain", DefenseKind.none),
            "smoothed": export_classifier(model, folder, "smoothed", DefenseKind.smoothing, 0.25),
            "shards": fashion_shards}


def val_batch(shards, count=128):
    data = load_config(LoaderConfig, None, [f"shards={shards}", "split=val", "image_size=28", "channels=1",
                                            f"batch_size={count}", "num_threads=1", "augment=false",
                                            "eval_crop_fraction=1.0"])
    batch = next(iter(DaliLoader(data, 0, 1, 0, train=False)))
    return batch.images, batch.labels


def plain_spec():
    return DeploymentSpec(method="standard", weights="-", classifier=tiny_classifier_config(), defense=DefenseKind.none)


def smoothing_spec(sigma: float = 0.25):
    return DeploymentSpec(method="dmae", weights="-", classifier=tiny_classifier_config(),
                          defense=DefenseKind.smoothing, sigma=sigma)


def eval_model(network, spec: DeploymentSpec) -> EvalModel:
    """The evaluation's view of `network` deployed as `spec` says (as `load_deployed` builds it)."""
    return EvalModel(deployed_model(spec.defense, network, spec.sigma), spec)


# Fashion-MNIST's usual budgets (L-inf 0.1, L2 1.0): at 8/255 this small model kept 0.30 of its
# 0.41 on one CPU and 0.17 on another (its training differs in the last bits between CPUs).
@pytest.mark.parametrize("norm_name, epsilon", [("linf", 0.1), ("l2", 1.0)])
def test_pgd_respects_the_budget_and_breaks_a_trained_model(trained, norm_name, epsilon):
    images, labels = val_batch(trained["shards"])
    seen = []

    class Watched(EvalModel):  # records every iterate the attack takes a gradient at
        def eot_loss_and_grad(self, images01, *args):
            seen.append(images01.detach().clone())
            return super().eot_loss_and_grad(images01, *args)

    model = Watched(deployed_model(DefenseKind.none, trained["model"], 0.0), plain_spec())
    clean = (trained["model"](images).argmax(-1) == labels).float().mean().item()
    cfg = load_config(PGDConfig, None, [f"norm={norm_name}", f"epsilons=[{epsilon}]", "steps=20"])
    result, = pgd_attack(model, images, labels, list(range(len(labels))), cfg, 0, seed=0)
    assert len(seen) == 20
    for adv in seen:  # every iterate stays in the ball and in [0, 1]
        delta = (adv - images).flatten(1)
        size = delta.abs().max(1).values if norm_name == "linf" else delta.norm(dim=1)
        assert (size <= epsilon + 1e-5).all() and adv.min() >= 0 and adv.max() <= 1
    robust = result["correct"].float().mean().item()
    assert clean > 0.3 and robust < 0.5 * clean, (clean, robust)  # measured: 0.41 -> 0.07 (linf 0.1)


@pytest.mark.slow
def test_apgd_cascade_stays_in_the_ball_and_is_at_least_as_strong_as_pgd(trained):
    images, labels = val_batch(trained["shards"], 64)
    model = eval_model(trained["model"], plain_spec())
    aa = load_config(AutoAttackConfig, None, ["enabled=true", "version=apgd", "epsilon=0.0157", "steps=20",
                                              "targets=3"])
    pgd, = pgd_attack(model, images, labels, list(range(64)), load_config(PGDConfig, None, ["epsilons=[0.0157]",
                                                                                           "steps=20"]), 0, seed=0)
    results = autoattack(model, images, labels, list(range(64)), aa, seed=0)
    clean = trained["model"](images).argmax(-1) == labels
    for name in ("apgd-ce", "aa"):
        assert (results[name]["distance"] <= 0.0157 + 1e-6).all()
        assert not (results[name]["correct"] & ~clean).any()  # never "robust" where clean is wrong
    cascade = results["aa"]["correct"]
    assert (cascade <= results["apgd-ce"]["correct"]).all()  # the targeted runs only ever remove samples
    assert cascade.float().mean() <= pgd["correct"].float().mean() + 0.05
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]  # AutoAttack's schedule for 100 steps


@pytest.mark.slow
def test_apgd_matches_torchattacks_apgd_on_the_same_model_and_inputs(trained):
    """Our APGD-CE and the APGD-CE -> APGD-T cascade against torchattacks' APGD and APGDT (ports of
    AutoAttack's own) on 200 validation images: robust accuracy within 1 point (2 images)."""
    import torchattacks

    images, labels = val_batch(trained["shards"], 200)
    network = trained["model"].eval()
    eps, steps, targets = 0.0157, 20, 3
    aa = load_config(AutoAttackConfig, None, ["enabled=true", "version=apgd", f"epsilon={eps}", f"steps={steps}",
                                              f"targets={targets}"])
    ours = autoattack(eval_model(network, plain_spec()), images, labels, list(range(200)), aa, seed=0)

    def robust(adv, y):
        with torch.no_grad():
            return network(adv).argmax(-1) == y

    apgd_ce = torchattacks.APGD(network, norm="Linf", eps=eps, steps=steps, seed=0, loss="ce")
    reference_ce = robust(apgd_ce(images, labels), labels)
    apgd_t = torchattacks.APGDT(network, norm="Linf", eps=eps, steps=steps, seed=0, n_classes=10)
    apgd_t.n_target_classes = targets  # the top 3 other classes, as ours
    survivors = labels[reference_ce]
    reference_t = robust(apgd_t(images[reference_ce], survivors), survivors)  # on APGD-CE's survivors
    theirs_aa = reference_ce.clone()
    theirs_aa[reference_ce] = reference_t
    measured = {"ours_ce": ours["apgd-ce"]["correct"].float().mean().item(),
                "theirs_ce": reference_ce.float().mean().item(),
                "ours_aa": ours["aa"]["correct"].float().mean().item(),
                "theirs_aa": theirs_aa.float().mean().item()}
    assert 0.05 < measured["theirs_aa"] < measured["theirs_ce"], measured  # the attack bites, the targets add
    assert abs(measured["ours_ce"] - measured["theirs_ce"]) <= 0.01 + 1e-9, measured
    assert abs(measured["ours_aa"] - measured["theirs_aa"]) <= 0.01 + 1e-9, measured


@pytest.mark.slow
def test_apgd_on_a_randomized_model_is_not_weaker_than_pgd(trained):
    """A smoothing base classifier (σ 0.25) under EOT: APGD scores its candidate iterates by the same
    majority vote as PGD, so it may not come out weaker. Robust images of 64, measured when written
    (PGD / APGD-CE): seeds 0, 1, 2 gave 5 / 5, 4 / 5, 4 / 3; at seed 0, APGD returning its first
    iterate a majority of its 4 EOT draws misclassified gave 5 / 10, its iterate of highest EOT
    loss alone 5 / 7. The vote's own sampling allows one image either way."""
    images, labels = val_batch(trained["shards"], 64)
    model = eval_model(trained["model"], smoothing_spec())
    indices = list(range(64))
    pgd, = pgd_attack(model, images, labels, indices, load_config(PGDConfig, None, [
        "epsilons=[0.1]", "steps=20", "eot=4", "score_draws=8"]), 0, seed=0)
    aa = load_config(AutoAttackConfig, None, ["enabled=true", "version=apgd", "epsilon=0.1", "steps=20", "targets=0",
                                              "eot=4", "score_draws=8"])
    apgd_ce = autoattack(model, images, labels, indices, aa, seed=0)["apgd-ce"]
    clean = model.vote(images, [torch.Generator().manual_seed(i) for i in indices], 8) == labels
    measured = (clean.float().mean().item(), pgd["correct"].float().mean().item(),
                apgd_ce["correct"].float().mean().item())
    assert measured[1] < measured[0], measured  # PGD bites
    assert measured[2] <= measured[1] + 1 / 64, measured


def test_standard_autoattack_runs_the_whole_suite_after_apgd_ce(trained):
    """version=standard: torchattacks' APGD-CE, APGD-T, FAB-T and Square in turn. Its first attack is
    APGD-CE with the same seed on the same batch, so the suite can only remove samples from
    what that attack alone leaves robust; a randomized model is refused, naming version=rand."""
    import torchattacks

    images, labels = val_batch(trained["shards"], 48)
    model = eval_model(trained["model"], plain_spec())
    aa = load_config(AutoAttackConfig, None, ["enabled=true", "version=standard", "epsilon=0.0157", "steps=10",
                                              "targets=2", "square_queries=20"])
    indices = list(range(100, 148))
    results = autoattack(model, images, labels, indices, aa, seed=3)
    assert set(results) == {"aa"}
    assert attack_key(autoattack_fields(aa, "aa")) == "aa10_linf_standard_eps0.0157_targets2_queries20"
    suite = results["aa"]
    apgd_ce_alone = torchattacks.APGD(trained["model"], norm="Linf", eps=0.0157, steps=10, seed=3 + 100,
                                      loss="ce")(images, labels)
    with torch.no_grad():
        alone = trained["model"](apgd_ce_alone).argmax(-1) == labels
        clean = trained["model"](images).argmax(-1) == labels
    assert (suite["correct"] <= alone).all() and (alone <= clean).all()
    assert suite["correct"].sum() < clean.sum()
    assert (suite["distance"] <= 0.0157 + 1e-6).all()
    with pytest.raises(UserError, match="autoattack.version=rand"):
        autoattack(eval_model(trained["model"], smoothing_spec()), images, labels, indices, aa, seed=3)


def test_rand_autoattack_adds_untargeted_apgd_dlr_with_eot(trained):
    images, labels = val_batch(trained["shards"], 24)
    model = eval_model(trained["model"], smoothing_spec())
    aa = load_config(AutoAttackConfig, None, ["enabled=true", "version=rand", "epsilon=0.05", "steps=5", "eot=2",
                                              "score_draws=3"])
    results = autoattack(model, images, labels, list(range(24)), aa, seed=0)
    assert set(results) == {"apgd-ce", "aa"}
    assert attack_key(autoattack_fields(aa, "aa")) == "aa5_linf_rand_eps0.05_eot2_votes3"
    assert attack_key(autoattack_fields(aa, "apgdce")) == "apgdce5_linf_ce_eps0.05_eot2_votes3"
    assert (results["aa"]["correct"] <= results["apgd-ce"]["correct"]).all()
    assert (results["aa"]["distance"] <= 0.05 + 1e-6).all()
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, -3.0]])  # DLR: -(z_y - max other) / (z_1 - z_3)
    assert torch.allclose(dlr_untargeted(z, torch.tensor([0, 2])), torch.tensor([-(3 - 1) / 3.0, -(1 - 2) / 2.0]))


@pytest.mark.parametrize("part, overrides, key, label", [
    ("aa", ["version=standard", "steps=100", "epsilon=0.01569"], "aa100_linf_standard_eps0.01569_targets9_queries5000",
     "AutoAttack standard (100 steps) L∞ ε=4/255"),
    ("aa", ["version=rand", "steps=20", "norm=l2", "epsilon=0.5"], "aa20_l2_rand_eps0.5_eot20_votes8",
     "AutoAttack rand (20 steps) L2 ε=0.5"),
    ("aa", ["version=apgd", "steps=50", "epsilon=0.05"], "aa50_linf_cascade_eps0.05_eot20_votes8_targets9",
     "APGD-CE+T-50 L∞ ε=0.05 (cascade)"),
    ("apgdce", ["version=apgd", "steps=50", "epsilon=0.05"], "apgdce50_linf_ce_eps0.05_eot20_votes8",
     "APGD-CE-50 L∞ ε=0.05 (ce)"),
])
def test_the_report_names_the_suite_that_ran(part, overrides, key, label):
    fields = autoattack_fields(load_config(AutoAttackConfig, None, ["enabled=true", *overrides]), part)
    assert (attack_key(fields), attack_label(fields)) == (key, label)


def test_attack_keys_hold_every_setting_and_an_attack_configured_twice_is_refused():
    """Two PGD attacks that differ only in step size, restarts, EOT, votes or random start get
    their own keys (neither overwrites the other's results); the same attack twice is refused."""
    from robustmim.eval.config import EvalConfig

    base = "{epsilons: [0.05], steps: 10, eot: 8, score_draws: 8"
    variants = ["", ", step_size: 0.01", ", restarts: 2", ", eot: 4", ", score_draws: 4", ", random_start: false"]
    cfg = load_config(EvalConfig, None, ["model=m", "shards=s", "out_dir=o",
                                        f"attacks=[{', '.join(base + v + '}' for v in variants)}]"])
    planned = planned_attacks(cfg)
    assert list(planned) == [
        "pgd10_linf_ce_eps0.05_step0.0125_restarts1_eot8_votes8",
        "pgd10_linf_ce_eps0.05_step0.01_restarts1_eot8_votes8",
        "pgd10_linf_ce_eps0.05_step0.0125_restarts2_eot8_votes8",
        "pgd10_linf_ce_eps0.05_step0.0125_restarts1_eot4_votes8",
        "pgd10_linf_ce_eps0.05_step0.0125_restarts1_eot8_votes4",
        "pgd10_linf_ce_eps0.05_step0.0125_restarts1_eot8_votes8_nostart"]
    assert {attack_label(fields) for fields in planned.values()} == {"PGD-10 L∞ ε=0.05 (ce)"}
    assert len(set(attack_labels(planned).values())) == len(variants)  # the report tells them apart
    first = next(iter(planned))
    assert attack_labels(planned)[first] == "PGD-10 L∞ ε=0.05 (ce, step 0.0125, restarts 1, eot 8, votes 8)"
    twice = load_config(EvalConfig, None, ["model=m", "shards=s", "out_dir=o", f"attacks=[{base}}}, {base}}}]"])
    with pytest.raises(UserError, match=r"attacks.1: pgd10_linf_ce_eps0.05_step0.0125_restarts1_eot8_votes8 is "
                                        r"configured twice"):
        planned_attacks(twice)


def saved_bytes_peak(fn) -> int:
    """The most bytes autograd held saved for backward at any moment while `fn` ran."""
    live = {"now": 0, "peak": 0}

    class Saved:
        def __init__(self, tensor):
            self.tensor, self.size = tensor, tensor.numel() * tensor.element_size()
            live["now"] += self.size
            live["peak"] = max(live["peak"], live["now"])

        def __del__(self):
            live["now"] -= self.size

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
        fn()
    return live["peak"]


def test_eot_gradients_are_exact_and_their_memory_does_not_grow_with_the_draws(trained):
    images, labels = val_batch(trained["shards"], 16)
    model = eval_model(trained["model"], smoothing_spec())
    assert not any(p.requires_grad for p in model.module.parameters())  # an attack needs input gradients only
    indices = list(range(16))

    def generators():
        return [torch.Generator().manual_seed(1000 + i) for i in indices]

    def loss_of(log_probs):
        return -log_probs.gather(1, labels.view(-1, 1)).squeeze(1)

    peaks = {}
    for draws in (1, 4, 16):
        result = {}
        peaks[draws] = saved_bytes_peak(lambda: result.update(zip(("loss", "grad"), model.eot_loss_and_grad(
            images, generators(), draws, loss_of))))
        x = images.clone().requires_grad_(True)  # the reference: every draw in one graph
        reference = loss_of(model.mean_log_probs(x, generators(), draws))
        grad, = torch.autograd.grad(reference.sum(), x)
        assert torch.allclose(result["loss"], reference.detach(), rtol=1e-5, atol=1e-6)
        assert torch.allclose(result["grad"], grad, rtol=1e-4, atol=1e-7)
    assert peaks[16] == peaks[4] and peaks[4] <= 1.05 * peaks[1], peaks  # one draw's graph at a time


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["plain", "smoothed"])
def test_compacted_attacks_give_the_records_of_full_attacks(trained, defense):
    """Later restarts, larger epsilons and APGD-T targets on the still-robust samples only:
    exactly the results of attacking every sample every time."""
    images, labels = val_batch(trained["shards"], 24)
    spec = plain_spec() if defense == "plain" else smoothing_spec()
    model = eval_model(trained["model"], spec)
    indices = list(range(100, 124))
    pgd = load_config(PGDConfig, None, ["epsilons=[0.03, 0.01]", "steps=3", "restarts=2", "eot=2", "score_draws=3"])
    aa = load_config(AutoAttackConfig, None, ["enabled=true", "version=apgd", "epsilon=0.02", "steps=4", "targets=3",
                                              "eot=2", "score_draws=3"])
    for compact_result, full_result in [
            (pgd_attack(model, images, labels, indices, pgd, 0, seed=5, compact=True),
             pgd_attack(model, images, labels, indices, pgd, 0, seed=5, compact=False)),
            (autoattack(model, images, labels, indices, aa, seed=5, compact=True),
             autoattack(model, images, labels, indices, aa, seed=5, compact=False))]:
        pairs = zip(compact_result, full_result) if isinstance(compact_result, list) else \
            ((compact_result[k], full_result[k]) for k in compact_result)
        for compact, full in pairs:
            for key in ("pred", "correct", "distance"):
                assert torch.equal(compact[key], full[key]), key
    small, large = pgd_attack(model, images, labels, indices, pgd, 0, seed=5)[::-1]
    assert (large["correct"] <= small["correct"]).all()  # fooled at 0.01 stays fooled at 0.03


def test_bf16_autocast_agrees_with_fp32_on_predictions_and_robust_accuracy(trained):
    """Stated tolerance: >= 97% of clean predictions equal, PGD robust accuracy within 5 points."""
    images, labels = val_batch(trained["shards"], 128)
    model = eval_model(trained["model"], plain_spec())
    pgd = load_config(PGDConfig, None, ["epsilons=[0.0157]", "steps=5"])
    outcome = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                pred = model.logits(images, []).argmax(-1)
            robust, = pgd_attack(model, images, labels, list(range(128)), pgd, 0, seed=0)
        outcome[name] = (pred, robust["correct"].float().mean().item())
    assert (outcome["bf16"][0] == outcome["fp32"][0]).float().mean() >= 0.97
    assert abs(outcome["bf16"][1] - outcome["fp32"][1]) <= 0.05, outcome


def test_compiled_blocks_give_the_eager_logits_and_attack_outcomes(trained):
    """`compile` (on by default on GPU) on CPU: the same logits within float tolerance (inductor
    fuses, so not bit for bit) and the same PGD outcomes, for a plain and a smoothing model (EOT)."""
    import copy

    from robustmim.pipeline.models.vit import compile_blocks

    images, labels = val_batch(trained["shards"], 32)
    compiled_module = copy.deepcopy(trained["model"])
    assert compile_blocks(compiled_module) == len(compiled_module.blocks)
    pgd = load_config(PGDConfig, None, ["epsilons=[0.05]", "steps=3", "eot=2"])
    for spec in (plain_spec(), smoothing_spec()):
        eager, compiled = eval_model(copy.deepcopy(trained["model"]), spec), eval_model(compiled_module, spec)
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) if eager.randomized else None
        with torch.no_grad():
            assert torch.allclose(compiled.forward(images, noise), eager.forward(images, noise), rtol=1e-4, atol=1e-5)
        outcomes = [pgd_attack(model, images, labels, list(range(32)), pgd, 0, seed=0)[0]["correct"]
                    for model in (eager, compiled)]
        assert torch.equal(outcomes[0], outcomes[1]), spec.defense


class Constant(nn.Module):
    def forward(self, images):
        return torch.tensor([0.0, 5.0, 0.0]).expand(images.shape[0], 3) + 0 * images.flatten(1).sum(1, keepdim=True)


def test_a_constant_classifier_is_unaffected_by_pgd_and_apgd():
    images, labels = torch.rand(8, 1, 28, 28), torch.full((8,), 1)
    spec = DeploymentSpec(method="standard", weights="-", classifier=tiny_classifier_config(num_classes=3))
    result, = pgd_attack(eval_model(Constant(), spec), images, labels, list(range(8)),
                         load_config(PGDConfig, None, ["steps=5"]), 0, seed=0)
    assert result["correct"].all()
    aa = load_config(AutoAttackConfig, None, ["version=apgd", "steps=5", "targets=0"])
    assert autoattack(eval_model(Constant(), spec), images, labels, list(range(8)), aa, seed=0)["aa"]["correct"].all()


@pytest.mark.parametrize("k, n, alpha", [(9990, 10000, 0.001), (600, 1000, 0.001), (51, 100, 0.05),
                                         (1, 10, 0.001), (100, 100, 0.001)])
def test_clopper_pearson_lower_bound_matches_scipy(k, n, alpha):
    ours = clopper_pearson_lower(k, n, alpha)
    exact = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert ours == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert binom.sf(k - 1, n, ours) == pytest.approx(alpha, rel=1e-6)  # P(X >= k | p_lower) = alpha
    assert clopper_pearson_lower(0, n, alpha) == 0.0


class Linear2(nn.Module):
    """Two classes split by the hyperplane w.x + b = 0: the smoothed classifier's radius is the
    distance |w.x + b| / |w| (Cohen et al., linear case), known in closed form."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([-score, score], dim=1)


def test_certify_recovers_the_linear_classifiers_radius_within_the_bounds_slack():
    torch.manual_seed(0)
    w = torch.randn(16)
    sigma, n, alpha = 0.5, 10_000, 0.001
    for distance in (0.1, 0.4, 0.8):
        x = torch.rand(16)
        b = distance * w.norm() - x @ w  # x at `distance` on class 1's side
        classifier = Linear2(w, b)
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        cert = certify(classifier, x.view(1, 4, 4), sigma, 100, n, alpha, 1000, *gens, num_classes=2)
        p_a = norm.cdf(distance / sigma)
        slack = 4 * math.sqrt(p_a * (1 - p_a) / n) + 3.1 * math.sqrt(p_a * (1 - p_a) / n)
        assert cert.prediction == 1
        assert sigma * norm.ppf(max(p_a - slack, 0.5)) <= cert.radius <= distance + 1e-9, (distance, cert)


def test_the_largest_certifiable_radius_is_what_a_unanimous_vote_certifies():
    w = torch.ones(16)
    x = torch.full((16,), 0.5)
    far = Linear2(w, -(x @ w) + 1e6)  # every noisy copy votes for class 1
    for sigma, n, alpha in ((0.25, 500, 0.001), (0.5, 2000, 0.01)):
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        cert = certify(far, x.view(1, 4, 4), sigma, 50, n, alpha, 250, *gens, num_classes=2)
        assert cert.count == n
        assert cert.radius == pytest.approx(largest_certifiable_radius(sigma, n, alpha), rel=1e-9)
    assert largest_certifiable_radius(0.25, 500, 0.001) == pytest.approx(0.5513, abs=1e-4)


def test_abstention_on_the_boundary_and_predict_s_binomial_test():
    w = torch.ones(16)
    x = torch.full((16,), 0.5)
    on_boundary = Linear2(w, -(x @ w))  # p_A = 1/2 exactly
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    cert = certify(on_boundary, x.view(1, 4, 4), 0.25, 100, 2000, 0.001, 500, *gens, num_classes=2)
    assert cert.prediction == ABSTAIN and cert.radius == 0.0
    assert predict(on_boundary, x.view(1, 4, 4), 0.25, 1000, 0.001, 500, torch.Generator().manual_seed(3), 2) == ABSTAIN
    far = Linear2(w, -(x @ w) + 2.0)
    assert predict(far, x.view(1, 4, 4), 0.25, 1000, 0.001, 500, torch.Generator().manual_seed(3), 2) == 1


# -- the command: sharding, resume, merge, report --------------------------------------------
PGD3 = "pgd3_linf_ce_eps0.0157_step0.01308_restarts1_eot2_votes3"  # EVAL_SETTINGS' attack: 2.5 * 0.0157 / 3 steps
EVAL_SETTINGS = ["every_nth=250", "batch_size=16", "num_threads=1", "eval_crop_fraction=1.0", "clean_draws=4",
                 "attacks=[{epsilons: [0.0157], steps: 3, eot: 2, score_draws: 3}]",
                 "certify.enabled=true", "certify.n0=20", "certify.n=200", "certify.batch=100",
                 "predict.enabled=true", "predict.n=100", "predict.batch=100"]


def run_eval(model_json, shards, out, *extra, nproc=1, wait=True):
    args = [ROBUSTMIM, "eval", "--model", model_json, "--data", shards, "--out", out, "--nproc-per-node", str(nproc),
            *EVAL_SETTINGS, *extra]
    proc = subprocess.Popen(list(map(str, args)), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    return finish(proc) if wait else proc


def merged(out) -> list[dict]:
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("time_s")
    return records


@pytest.fixture(scope="module")
def one_rank(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "one_rank"
    run_eval(trained["smoothed"], trained["shards"], out)
    return out


@pytest.mark.slow
def test_one_rank_eval_writes_records_cohen_table_and_summary(one_rank):
    records = merged(one_rank)
    assert [r["idx"] for r in records] == list(range(0, 10000, 250))  # every 250th of the val split
    summary = json.loads((one_rank / "summary.json").read_text())
    assert summary["samples"] == 40 and summary["defense"] == "smoothing"
    assert set(summary["attacks"]) == {PGD3}
    assert {k: summary["attacks"][PGD3][k] for k in ("attack", "norm", "loss", "epsilon", "steps", "eot")} == {
        "attack": "pgd", "norm": "linf", "loss": "ce", "epsilon": 0.0157, "steps": 3, "eot": 2}
    assert summary["certify"]["sigma"] == 0.25 and "0.25" in summary["certify"]["certified_accuracy"]
    table = (one_rank / "certify.tsv").read_text().splitlines()
    assert table[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime" and len(table) == 41
    for record in records:
        assert record["attacks"][PGD3]["distance"] <= 0.0157 + 1e-6
        cert = record["certify"]
        assert (cert["predict"] == ABSTAIN) == (cert["radius"] == 0.0 and cert["p_lower"] < 0.5)


@pytest.mark.slow
def test_status_counts_the_recorded_samples_of_an_evaluation(one_rank):
    shown = subprocess.run([ROBUSTMIM, "status", str(one_rank)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f"{one_rank}: eval (started here" in shown.stdout and "evaluation: 40 of 40 samples recorded; merged" \
        in shown.stdout


@pytest.mark.slow
def test_an_eval_with_compiled_blocks_reaches_the_eager_outcomes(trained, one_rank, tmp_path):
    """`compile=true` through `robustmim eval` (what a GPU does by default): every sample's clean,
    attack and certification outcome as in the eager evaluation."""
    run_eval(trained["smoothed"], trained["shards"], tmp_path / "compiled", "compile=true")

    def outcomes(records):
        return [(r["idx"], r["clean"]["correct"], r["attacks"][PGD3]["correct"], r["certify"]["predict"],
                 r["predict"]["predict"]) for r in records]

    assert outcomes(merged(tmp_path / "compiled")) == outcomes(merged(one_rank))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_equal_one_rank_record_for_record(trained, one_rank, tmp_path):
    run_eval(trained["smoothed"], trained["shards"], tmp_path / "two", nproc=2)
    assert merged(tmp_path / "two") == merged(one_rank)
    assert {p.name for p in (tmp_path / "two" / "records").iterdir()} == {"rank00000.jsonl", "rank00001.jsonl"}


@pytest.mark.distributed
@pytest.mark.slow
def test_accelerate_launch_equals_one_rank_record_for_record(trained, one_rank, tmp_path):
    """Hugging Face accelerate's launcher (`accelerate launch --multi_gpu --num_processes 2 -m
    robustmim.cli eval ...`) starts the ranks through torchrun's machinery with its own process
    variables: they split the samples in contiguous chunks and merge them as torchrun's ranks do.
    Started as `python -m accelerate.commands.launch`, the `launch` subcommand itself: the
    `accelerate` script also loads its `estimate` command, which imports timm, hence torchvision,
    whose wheels need a CUDA torch."""
    out = tmp_path / "accelerate"
    args = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "robustmim.cli", "eval", "--model", trained["smoothed"], "--data", trained["shards"], "--out", out,
            *EVAL_SETTINGS]
    finish(subprocess.Popen(list(map(str, args)), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True))
    assert merged(out) == merged(one_rank)
    assert {p.name for p in (out / "records").iterdir()} == {"rank00000.jsonl", "rank00001.jsonl"}
    first, second = ([json.loads(line)["idx"] for line in (out / "records" / name).read_text().splitlines()]
                     for name in ("rank00000.jsonl", "rank00001.jsonl"))
    assert first and second and max(first) < min(second)  # contiguous chunks, in order


@pytest.mark.slow
def test_a_killed_eval_resumes_with_every_sample_exactly_once(trained, one_rank, tmp_path):
    out = tmp_path / "killed"
    proc = run_eval(trained["smoothed"], trained["shards"], out, "batch_size=4", wait=False)
    records = rank_file(out, 0)
    wait_for(lambda: records.exists() and len(records.read_text().splitlines()) >= 8, proc, what="8 records")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(records.read_text().splitlines())
    assert 8 <= done < 40
    with open(records, "a") as f:
        f.write('{"idx": 99999, "label": 3, "cl')  # a line cut by the kill
    run_eval(trained["smoothed"], trained["shards"], out, "batch_size=4")
    assert merged(out) == merged(one_rank)  # the same outcome as a single uninterrupted pass
    assert len(records.read_text().splitlines()) == 40


def test_merge_fails_loudly_on_a_gap_or_a_duplicate(tmp_path):
    out = tmp_path / "eval"
    (out / "records").mkdir(parents=True)
    rank_file(out, 0).write_text("".join(json.dumps({"idx": i}) + "\n" for i in (0, 2, 4)))
    rank_file(out, 1).write_text(json.dumps({"idx": 6}) + "\n")
    assert [r["idx"] for r in merge_records(out, [0, 2, 4, 6])] == [0, 2, 4, 6]
    with pytest.raises(UserError, match=r"1 of 5 samples have no record \(first: \[8\]\)"):
        merge_records(out, [0, 2, 4, 6, 8])
    rank_file(out, 1).write_text(json.dumps({"idx": 6}) + "\n" + json.dumps({"idx": 2}) + "\n")
    with pytest.raises(UserError, match="index 2 in rank00000.jsonl and rank00001.jsonl"):
        merge_records(out, [0, 2, 4, 6])


def test_records_made_under_other_settings_do_not_merge(tmp_path):
    out = tmp_path / "eval"
    (out / "records").mkdir(parents=True)
    rank_file(out, 0).write_text("".join(json.dumps({"idx": i, "settings": "aaaa"}) + "\n" for i in (0, 1)))
    rank_file(out, 1).write_text(json.dumps({"idx": 2, "settings": "bbbb"}) + "\n")
    assert [r["idx"] for r in merge_records(out, [0, 1, 2])] == [0, 1, 2]  # no digest asked for
    with pytest.raises(UserError, match=r"rank00001.jsonl: the record of index 2 was made with other settings"):
        merge_records(out, [0, 1, 2], settings_digest="aaaa")


@pytest.mark.slow
def test_a_restart_with_other_attack_settings_is_refused_or_starts_fresh(trained, tmp_path):
    """Half an evaluation, then the same command with another PGD step size: the old records
    would mix with new ones (a different attack), so it is refused naming the setting; with
    fresh=true the old evaluation moves aside and the new one is complete and its own."""
    out = tmp_path / "eval"
    plain = ["certify.enabled=false", "predict.enabled=false"]
    proc = run_eval(trained["plain"], trained["shards"], out, *plain, "batch_size=4", wait=False)
    records = rank_file(out, 0)
    wait_for(lambda: records.exists() and len(records.read_text().splitlines()) >= 8, proc, what="8 records")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = records.read_text()

    changed = subprocess.run(list(map(str, [ROBUSTMIM, "eval", "--model", trained["plain"], "--data", trained["shards"],
                                            "--out", out, *EVAL_SETTINGS, *plain,
                                            "attacks=[{epsilons: [0.0157], steps: 3, eot: 2, score_draws: 3, "
                                            "step_size: 0.01}]"])),
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert "attacks.0.step_size: 0.0 -> 0.01" in changed.stderr and "fresh=true" in changed.stderr
    assert records.read_text() == done  # nothing touched

    log = run_eval(trained["plain"], trained["shards"], out, *plain, "fresh=true",
                   "attacks=[{epsilons: [0.0157], steps: 3, eot: 2, score_draws: 3, step_size: 0.01}]")
    # progress, as plain lines where stderr is not a terminal: 40 samples in batches of 16
    assert re.search(r"eval: samples 16/40 [\d.]+ samples/s, eta [\d.]+ min\n", log), log[-2000:]
    assert "eval: samples 40/40 " in log
    (aside,) = (out / "superseded").iterdir()
    assert (aside / "records" / "rank00000.jsonl").read_text() == done
    plan = json.loads((out / "plan.json").read_text())
    assert plan["record_settings"]["attacks.0.step_size"] == 0.01
    assert {r["settings"] for r in merged(out)} == {plan["settings_digest"]} and len(merged(out)) == 40


@pytest.mark.slow
def test_report_puts_models_in_one_table_with_plots(trained, one_rank, tmp_path):
    """Two models in one table; the second also ran the first's PGD with another step size: its
    own key and its own column (detailed labels where short ones would collide), never merged."""
    plain = tmp_path / "plain"
    run_eval(trained["plain"], trained["shards"], plain, "certify.enabled=false", "predict.enabled=false",
             "attacks=[{epsilons: [0.0157], steps: 3, eot: 2, score_draws: 3}, "
             "{epsilons: [0.0157], steps: 3, eot: 2, score_draws: 3, step_size: 0.01}]")
    assert set(json.loads((plain / "summary.json").read_text())["attacks"]) == {
        PGD3, PGD3.replace("step0.01308", "step0.01")}
    result = subprocess.run([ROBUSTMIM, "report", str(one_rank), str(plain), "--out", str(tmp_path / "report")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    for label in ("one_rank", "plain"):  # the encoder and the fine-tuning budget sit beside the method
        row = rf"\| {label} \| standard \| scratch \| {TRAIN_STEPS * 64} \| 40 \| \d+\.\d \["
        assert re.search(row, report), report
    assert "cert. r=0.5 (σ=0.25)" in report
    header, one_rank_row, plain_row = [line for line in report.splitlines()
                                       if line.startswith(("| model ", "| one_rank ", "| plain "))]

    def split(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    cells = dict(zip(split(header), split(one_rank_row)))
    plain_cells = dict(zip(split(header), split(plain_row)))
    default_step = "PGD-3 L∞ ε=4/255 (ce, step 0.01308, restarts 1, eot 2, votes 3)"
    other_step = "PGD-3 L∞ ε=4/255 (ce, step 0.01, restarts 1, eot 2, votes 3)"
    assert cells[default_step] != "–" and cells[other_step] == "–"
    assert plain_cells[default_step] != "–" and plain_cells[other_step] != "–"
    # n 200, alpha 0.001 at sigma 0.25 reach r 0.456 at most: r 0.5 and beyond are flagged, r 0.25 not
    assert cells["cert. r=0.5 (σ=0.25)"].endswith("†") and cells["cert. r=3 (σ=0.25)"].endswith("†")
    assert not cells["cert. r=0.25 (σ=0.25)"].endswith("†")
    assert "† A radius beyond sigma * Phi^-1(alpha^(1/n))" in report
    for plot in ("certified_accuracy.png", "accuracy_vs_epsilon_linf.png"):
        assert (tmp_path / "report" / plot).stat().st_size > 1000


def test_accuracy_vs_epsilon_curves_hold_pgd_only():
    """An APGD cascade at one ε sits in the table, not on the PGD curve it would seem to bend."""
    from robustmim.eval.report import pgd_curves
    from robustmim.eval.summary import summarize

    pgd = load_config(PGDConfig, None, ["epsilons=[0.05, 0.1]", "steps=10"])
    pgd_l2 = load_config(PGDConfig, None, ["norm=l2", "epsilons=[1.0]", "steps=10"])
    cascade = load_config(AutoAttackConfig, None, ["enabled=true", "version=apgd", "epsilon=0.05", "steps=50"])
    fields = [pgd_fields(pgd, 0.05), pgd_fields(pgd, 0.1), autoattack_fields(cascade, "aa"), pgd_fields(pgd_l2, 1.0)]
    keys = [attack_key(f) for f in fields]

    def record(i):
        outcomes = [(i % 2 == 0, 0.05), (i % 4 == 0, 0.1), (False, 0.05), (i % 5 == 0, 1.0)]
        return {"clean": {"correct": True},
                "attacks": {key: {"correct": c, "distance": d} for key, (c, d) in zip(keys, outcomes)}}

    plan = {"model": "m", "method": "standard", "defense": "none", "split": "test", "seed": 0,
            "attacks": dict(zip(keys, fields))}
    summary = summarize([record(i) for i in range(20)], plan)
    assert [summary["attacks"][key]["attack"] for key in keys] == ["pgd", "pgd", "aa", "pgd"]
    assert pgd_curves([("m", summary)], "linf") == [("m", [(0.0, 1.0), (0.05, 0.5), (0.1, 0.25)])]
    assert pgd_curves([("m", summary)], "l2") == [("m", [(0.0, 1.0), (1.0, 0.2)])]


@pytest.mark.slow
def test_an_eval_with_standard_autoattack_appears_in_the_report(trained, tmp_path):
    out = tmp_path / "standard_aa"
    run_eval(trained["plain"], trained["shards"], out, "certify.enabled=false", "predict.enabled=false", "attacks=[]",
             "autoattack.enabled=true", "autoattack.version=standard", "autoattack.steps=5", "autoattack.targets=2",
             "autoattack.square_queries=20")
    summary = json.loads((out / "summary.json").read_text())
    (key,) = summary["attacks"]
    assert key == "aa5_linf_standard_eps0.01569_targets2_queries20"
    assert summary["attacks"][key]["accuracy"] <= summary["clean"]["accuracy"]
    result = subprocess.run([ROBUSTMIM, "report", str(out), "--out", str(tmp_path / "report")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "AutoAttack standard (5 steps) L∞ ε=4/255" in (tmp_path / "report" / "report.md").read_text()
    refused = subprocess.run([ROBUSTMIM, "eval", "--model", str(trained["smoothed"]), "--data", str(trained["shards"]),
                              "--out", str(tmp_path / "refused"), *EVAL_SETTINGS, "autoattack.enabled=true"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "autoattack.version=rand" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "refused" / "records").exists()  # refused before any work

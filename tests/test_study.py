"""The study's paired statistics: the exact McNemar test against scipy's binomial test, the
verdicts on per-sample records made here, and the refusals of unpaired arms."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess

import pytest
from scipy.stats import binomtest

from robustmim.eval.study import (CONTRADICTED, HOLDS, NOT_SIGNIFICANT, ClaimConfig, compare_claim, mcnemar_exact,
                                  verdict)
from robustmim.eval.attack_names import attack_key, pgd_fields
from robustmim.eval.config import PGDConfig
from robustmim.eval.summary import summarize
from robustmim.config import load_config
from robustmim.errors import UserError
from tests.helpers import REPO_ROOT, ROBUSTMIM

PGD = "pgd10_linf_ce_eps0.05"  # the head of the arms' attack key: how a study config names it
PGD_FIELDS = pgd_fields(load_config(PGDConfig, None, ["epsilons=[0.05]", "steps=10"]), 0.05)
PGD_KEY = attack_key(PGD_FIELDS)  # pgd10_linf_ce_eps0.05_step0.0125_restarts1_eot8_votes8


def outcome_pairs(both: int, treatment_only: int, control_only: int, neither: int, seed: int = 0):
    pairs = [(True, True)] * both + [(True, False)] * treatment_only + [(False, True)] * control_only
    pairs += [(False, False)] * neither
    random.Random(seed).shuffle(pairs)
    return [t for t, _ in pairs], [c for _, c in pairs]


@pytest.mark.parametrize("b, c", [(0, 0), (0, 1), (3, 3), (7, 2), (2, 7), (10, 25), (40, 38), (0, 30), (60, 1),
                                  (123, 150)])
def test_mcnemar_equals_the_binomial_test_on_the_discordant_pairs(b, c):
    treatment, control = outcome_pairs(both=50, treatment_only=b, control_only=c, neither=20, seed=b * 1000 + c)
    test = mcnemar_exact(treatment, control)
    assert (test["treatment_only"], test["control_only"]) == (b, c)
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert test["p_value"] == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_concordant_images_do_not_move_the_p_value():
    few = mcnemar_exact(*outcome_pairs(both=0, treatment_only=12, control_only=3, neither=0))
    many = mcnemar_exact(*outcome_pairs(both=900, treatment_only=12, control_only=3, neither=400))
    assert few["p_value"] == many["p_value"] < 0.05


def test_verdict_reads_the_direction_and_the_level():
    assert verdict({"treatment_only": 20, "control_only": 5, "p_value": 0.004}, 0.05) == HOLDS
    assert verdict({"treatment_only": 5, "control_only": 20, "p_value": 0.004}, 0.05) == CONTRADICTED
    assert verdict({"treatment_only": 20, "control_only": 5, "p_value": 0.004}, 0.001) == NOT_SIGNIFICANT
    assert verdict({"treatment_only": 9, "control_only": 5, "p_value": 0.42}, 0.05) == NOT_SIGNIFICANT


def write_arm(directory, clean, attacked, certified_radius=None, labels=None, indices=None, attack=None):
    """An evaluation directory as `robustmim eval` leaves it: merged records and their summary.
    `attack`: the attack's fields (PGD-10 at 0.05 with the default settings unless given)."""
    attack = attack or PGD_FIELDS
    directory.mkdir(parents=True)
    indices = indices or list(range(0, 20 * len(clean), 20))
    labels = labels or [i % 10 for i in range(len(clean))]
    records = []
    for position, (idx, label) in enumerate(zip(indices, labels)):
        record = {"idx": idx, "label": label,
                  "clean": {"pred": label if clean[position] else (label + 1) % 10, "correct": clean[position]},
                  "attacks": {attack_key(attack): {"correct": attacked[position], "distance": 0.05}}}
        if certified_radius is not None:
            radius = certified_radius[position]
            record["certify"] = {"predict": label if radius is not None else -1, "radius": radius or 0.0,
                                 "correct": radius is not None, "sigma": 0.25, "n0": 50, "n": 500, "alpha": 0.001}
        records.append(record)
    (directory / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plan = {"model": str(directory), "method": "m", "defense": "d", "split": "val", "seed": 0, "radii": [0.25],
            "attacks": {attack_key(attack): attack}}
    (directory / "summary.json").write_text(json.dumps(summarize(records, plan)))


def test_study_command_reports_each_verdict_from_the_records(tmp_path):
    n = 300
    clean_t, clean_c = outcome_pairs(both=250, treatment_only=5, control_only=5, neither=40, seed=1)
    pgd_t, pgd_c = outcome_pairs(both=100, treatment_only=40, control_only=8, neither=152, seed=2)
    write_arm(tmp_path / "robust", clean_t, pgd_t)
    write_arm(tmp_path / "plain", clean_c, pgd_c)
    weak = [True] * 60 + [False] * (n - 60)
    write_arm(tmp_path / "weak", clean_c, weak)
    radii_t = [0.6] * 150 + [0.3] * 100 + [None] * 50
    radii_c = [0.6] * 100 + [0.3] * 150 + [None] * 50
    write_arm(tmp_path / "smooth_t", clean_t, pgd_t, radii_t)
    write_arm(tmp_path / "smooth_c", clean_c, pgd_c, radii_c)
    config = tmp_path / "study.yaml"
    config.write_text(json.dumps({
        "title": "test study", "out": str(tmp_path / "results.md"), "produced_by": "pytest",
        "claims": [
            {"name": "robust", "treatment": str(tmp_path / "robust"), "control": str(tmp_path / "plain"),
             "metrics": ["clean", PGD]},
            {"name": "weak", "treatment": str(tmp_path / "weak"), "control": str(tmp_path / "plain"),
             "metrics": [PGD]},
            {"name": "smooth", "treatment": str(tmp_path / "smooth_t"), "control": str(tmp_path / "smooth_c"),
             "metrics": ["certified_r0.25", "certified_r0.5", "certified_r0.75"]}]}))
    result = subprocess.run([ROBUSTMIM, "study", "--config", str(config)], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    claims = json.loads((tmp_path / "results.json").read_text())["claims"]
    robust_clean, robust_pgd = claims["robust"]
    assert robust_clean["verdict"] == NOT_SIGNIFICANT and robust_clean["p_value"] == 1.0
    assert robust_pgd["verdict"] == HOLDS
    assert (robust_pgd["treatment_only"], robust_pgd["control_only"]) == (40, 8)
    assert robust_pgd["difference"] == pytest.approx((140 - 108) / n)
    assert robust_pgd["p_value"] == pytest.approx(binomtest(40, 48, 0.5).pvalue)
    (weak_pgd,) = claims["weak"]
    assert weak_pgd["verdict"] == CONTRADICTED and weak_pgd["treatment"]["correct"] == 60
    # certified at r: correct with radius >= r; 250 vs 250 (the same images) at 0.25, 150 vs 100 at 0.5, none at 0.75
    at_25, at_50, at_75 = claims["smooth"]
    assert (at_25["treatment"]["correct"], at_25["control"]["correct"], at_25["verdict"]) == (250, 250, NOT_SIGNIFICANT)
    assert (at_50["treatment"]["correct"], at_50["control"]["correct"], at_50["verdict"]) == (150, 100, HOLDS)
    assert at_75["treatment"]["correct"] == 0 and at_75["p_value"] == 1.0
    report = (tmp_path / "results.md").read_text()
    assert "Produced by `pytest`" in report and "**contradicted**" in report and "**holds**" in report
    assert "PGD-10 L∞ ε=0.05 (ce)" in report and "certified r=0.5 (σ=0.25)" in report
    assert "46.7 [" in report  # 140/300 with its interval
    for plot in ("accuracy_vs_epsilon_linf.png", "certified_accuracy.png"):
        assert (tmp_path / "results" / plot).stat().st_size > 1000


def test_arms_on_different_images_or_without_the_metric_are_refused(tmp_path):
    write_arm(tmp_path / "a", [True] * 10, [False] * 10)
    write_arm(tmp_path / "b", [True] * 10, [False] * 10, indices=list(range(0, 100, 10)))
    write_arm(tmp_path / "c", [True] * 10, [False] * 10, labels=[3] * 10)
    with pytest.raises(UserError, match="different images.*every_nth"):
        compare_claim(ClaimConfig(name="x", treatment=str(tmp_path / "a"), control=str(tmp_path / "b")), 0.05)
    with pytest.raises(UserError, match="has label"):
        compare_claim(ClaimConfig(name="x", treatment=str(tmp_path / "a"), control=str(tmp_path / "c")), 0.05)
    with pytest.raises(UserError, match=f"no metric 'aa100_linf_cascade_eps0.05'.*clean, {PGD_KEY}"):
        compare_claim(ClaimConfig(name="x", treatment=str(tmp_path / "a"), control=str(tmp_path / "a"),
                                  metrics=["aa100_linf_cascade_eps0.05"]), 0.05)


def test_arms_attacked_with_different_settings_are_refused(tmp_path):
    """The same head (PGD-10, L∞, ce, 0.05) but another step size in the control: not the same
    attack, so not a paired comparison; the error names both keys. The full key is accepted."""
    other_step = {**PGD_FIELDS, "step_size": 0.01}
    write_arm(tmp_path / "a", [True] * 10, [False] * 10)
    write_arm(tmp_path / "b", [True] * 10, [False] * 10, attack=other_step)
    with pytest.raises(UserError, match=f"different settings.*{PGD_KEY}.*{attack_key(other_step)}"):
        compare_claim(ClaimConfig(name="x", treatment=str(tmp_path / "a"), control=str(tmp_path / "b"),
                                  metrics=[PGD]), 0.05)
    (row,) = compare_claim(ClaimConfig(name="x", treatment=str(tmp_path / "a"), control=str(tmp_path / "a"),
                                       metrics=[PGD_KEY]), 0.05)
    assert row["key"] == PGD_KEY and row["label"] == "PGD-10 L∞ ε=0.05 (ce)"


def test_a_head_naming_several_attacks_of_an_arm_is_refused():
    from robustmim.eval.attack_names import resolve_attack

    keys = [PGD_KEY, attack_key({**PGD_FIELDS, "step_size": 0.01})]
    assert resolve_attack(PGD_KEY, keys) == PGD_KEY and resolve_attack("pgd10_linf_ce_eps0.1", keys) is None
    with pytest.raises(UserError, match=f"names 2 attacks that differ in their settings: {PGD_KEY}"):
        resolve_attack(PGD, keys)


@pytest.mark.parametrize("study, evaluation, finetune", [("tiny_fmnist", "tiny_fmnist", "dmae_tiny_fmnist"),
                                                         ("vitl_in1k", "imagenet", "dmae_vitl_in1k")])
def test_each_study_metric_is_one_its_evaluation_config_records(study, evaluation, finetune):
    """The study configs name attacks by hand; each must name one attack the matching eval config makes,
    and each certified radius one that CERTIFY can reach with its n and alpha at the DMAE recipe's sigma."""
    from robustmim.eval.attack_names import planned_attacks, resolve_attack
    from robustmim.eval.certify import largest_certifiable_radius
    from robustmim.eval.config import EvalConfig
    from robustmim.eval.study import CERTIFIED_PREFIX, StudyConfig
    from robustmim.pipeline.finetune.config import FinetuneConfig
    from robustmim.config import load_config

    cfg = load_config(StudyConfig, REPO_ROOT / "configs" / "study" / f"{study}.yaml")
    ev = load_config(EvalConfig, REPO_ROOT / "configs" / "eval" / f"{evaluation}.yaml")
    sigma = load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / f"{finetune}.yaml").recipe.dmae.sigma
    reach = largest_certifiable_radius(sigma, ev.certify.n, ev.certify.alpha)
    keys = list(planned_attacks(dataclasses.replace(ev, autoattack=dataclasses.replace(ev.autoattack, enabled=True))))
    assert len(cfg.claims) == 4
    for claim in cfg.claims:
        assert claim.treatment != claim.control and claim.metrics
        for metric in claim.metrics:
            if metric.startswith(CERTIFIED_PREFIX):
                assert 0 < float(metric[len(CERTIFIED_PREFIX):]) < reach, (metric, reach)
            elif metric != "clean":
                assert resolve_attack(metric, keys) is not None, (claim.name, metric, keys)


def test_an_evaluation_by_an_earlier_robustmim_is_refused_not_misread(tmp_path):
    """Records format 1 keyed attacks without their settings: its summary is refused by the report
    and its plan by the merge, each naming the file and fresh=true."""
    from robustmim.eval.report import load_summary
    from robustmim.eval.runner import finalize

    write_arm(tmp_path / "old", [True] * 10, [False] * 10)
    summary = json.loads((tmp_path / "old" / "summary.json").read_text())
    del summary["records_format"]
    (tmp_path / "old" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UserError, match=r"old/summary.json: written by an earlier robustmim.*fresh=true"):
        load_summary(tmp_path / "old")
    (tmp_path / "old" / "plan.json").write_text(json.dumps({"indices": [0], "record_settings": {"seed": 0}}))
    with pytest.raises(UserError, match=r"old/plan.json: an evaluation by an earlier robustmim.*fresh=true"):
        finalize(tmp_path / "old")

"""`robustmim study`: the papers' claims as controlled pairs, each read with a paired test.

A claim compares two evaluations of the same test images under the same attack: the arm the
claim is about (treatment) and its control, which differs only in what the claim is about
(e.g. DMAE vs MAE pretraining, both fine-tuned with the DMAE recipe). Because both arms saw the
same images, accuracies are compared per sample with the exact McNemar test: only the discordant
images (right in one arm, wrong in the other) carry information, and under "no difference" each
is equally likely to favour either arm, so their split is Binomial(b + c, 1/2). The verdict at
the study's alpha is "holds" (treatment significantly more accurate), "contradicted"
(significantly less accurate) or "not significant". A claim that does not hold is reported as
measured.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from robustmim.eval.attack_names import attack_label, resolve_attack
from robustmim.errors import UserError
from robustmim.fileio import atomic_write_text

HOLDS, NOT_SIGNIFICANT, CONTRADICTED = "holds", "not significant", "contradicted"
CERTIFIED_PREFIX = "certified_r"  # metric "certified_r0.25": certified correct at L2 radius >= 0.25


@dataclass
class ClaimConfig:
    name: str = MISSING  # a short label, e.g. "DMAE"
    claim: str = ""  # the paper's claim in one sentence, printed above its table
    treatment: str = MISSING  # the evaluation directory of the arm the claim is about
    control: str = MISSING  # the evaluation directory of its control arm
    # Per-sample accuracies compared: "clean", certified_r<radius>, or an attack: its records key or
    # the key's head (e.g. pgd10_linf_ce_eps0.05, aa50_linf_cascade_eps0.05) when that names one
    # attack. Both arms must have run it with every setting equal (the same key).
    metrics: list[str] = field(default_factory=lambda: ["clean"])


@dataclass
class StudyConfig:
    title: str = "Robustness claims, tested"  # the report's heading
    runs: str = "runs/demo"  # where the arms' runs live; claims refer to it as ${runs}
    claims: list[ClaimConfig] = field(default_factory=list)  # each: name, claim, treatment, control, metrics
    alpha: float = 0.05  # two-sided level of each paired test
    out: str = "docs/results.md"  # the report; its plots go to a folder of the same stem beside it
    produced_by: str = "robustmim study"  # the command recorded in the report's header

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


def mcnemar_exact(treatment: list[bool], control: list[bool]) -> dict:
    """Exact two-sided McNemar test on paired outcomes (True = correct).

    b: treatment right, control wrong; c: the reverse. p = P(|X - n/2| >= |b - n/2|) for
    X ~ Binomial(n = b + c, 1/2), i.e. twice the smaller tail, capped at 1."""
    from scipy.stats import binom

    if len(treatment) != len(control):
        raise ValueError(f"paired outcomes of unequal length: {len(treatment)} and {len(control)}")
    b = sum(1 for t, c in zip(treatment, control) if t and not c)
    c = sum(1 for t, c_ in zip(treatment, control) if c_ and not t)
    n = b + c
    p_value = 1.0 if n == 0 else min(1.0, 2.0 * float(binom.cdf(min(b, c), n, 0.5)))
    return {"treatment_only": b, "control_only": c, "p_value": p_value}


def verdict(test: dict, alpha: float) -> str:
    if test["p_value"] >= alpha:
        return NOT_SIGNIFICANT
    return HOLDS if test["treatment_only"] > test["control_only"] else CONTRADICTED


def load_records(eval_dir: str | Path) -> dict[int, dict]:
    """The merged per-sample records of an evaluation, by test index (merging the rank files
    first when only those exist)."""
    eval_dir = Path(eval_dir)
    path = eval_dir / "records.jsonl"
    if not path.is_file():
        if not eval_dir.is_dir():
            raise UserError(f"evaluation directory not found: {eval_dir}")
        from robustmim.eval.runner import finalize

        finalize(eval_dir)
    return {record["idx"]: record for record in map(json.loads, path.read_text().splitlines())}


def outcomes(record: dict, metric: str) -> bool | None:
    """Whether the sample counts as correct under `metric` (an attack's full key); None when
    the record lacks it."""
    if metric == "clean":
        return record["clean"]["correct"] if "clean" in record else None
    if metric.startswith(CERTIFIED_PREFIX):
        from robustmim.eval.summary import certified_at

        return certified_at(record, float(metric[len(CERTIFIED_PREFIX):])) if "certify" in record else None
    entry = record.get("attacks", {}).get(metric)
    return None if entry is None else entry["correct"]


def available_metrics(record: dict) -> list[str]:
    found = ["clean"] if "clean" in record else []
    found += list(record.get("attacks", {}))
    return found + ([f"{CERTIFIED_PREFIX}<radius>"] if "certify" in record else [])


def resolve_metric(claim: ClaimConfig, metric: str, treatment: dict[int, dict], control: dict[int, dict]) -> str:
    """The records key both arms hold for `metric`; an error when an arm lacks it or when the
    arms ran the attack with different settings (a comparison they cannot support)."""
    if metric == "clean" or metric.startswith(CERTIFIED_PREFIX):
        return metric
    keys = []
    for arm, records in ((claim.treatment, treatment), (claim.control, control)):
        first = next(iter(records.values()))
        try:
            key = resolve_attack(metric, first.get("attacks", {}))
        except UserError as e:
            raise UserError(f"claim {claim.name}: {arm}: {e}") from None
        if key is None:
            raise UserError(f"claim {claim.name}: {arm} has no metric {metric!r}; it has "
                            f"{', '.join(available_metrics(first))}")
        keys.append(key)
    if keys[0] != keys[1]:
        raise UserError(f"claim {claim.name}: the arms ran {metric!r} with different settings ({claim.treatment}: "
                        f"{keys[0]}; {claim.control}: {keys[1]}); evaluate both with the same attack")
    return keys[0]


def paired(claim: ClaimConfig, treatment: dict[int, dict], control: dict[int, dict], metric: str
           ) -> tuple[list[bool], list[bool]]:
    """Both arms' outcomes on the same images, in index order; an error when the arms were not
    evaluated on the same images (or labels) or a record lacks the metric."""
    if treatment.keys() != control.keys():
        only_t, only_c = sorted(treatment.keys() - control.keys()), sorted(control.keys() - treatment.keys())
        raise UserError(f"claim {claim.name}: {claim.treatment} and {claim.control} were evaluated on different "
                        f"images ({len(only_t)} only in the first, e.g. {only_t[:3]}; {len(only_c)} only in the "
                        f"second, e.g. {only_c[:3]}); evaluate both with the same split, every_nth and max_samples")
    pairs_t, pairs_c = [], []
    for idx in sorted(treatment):
        if treatment[idx]["label"] != control[idx]["label"]:
            raise UserError(f"claim {claim.name}: test index {idx} has label {treatment[idx]['label']} in "
                            f"{claim.treatment} but {control[idx]['label']} in {claim.control} (other shards?)")
        for arm, records, out in ((claim.treatment, treatment, pairs_t), (claim.control, control, pairs_c)):
            value = outcomes(records[idx], metric)
            if value is None:
                raise UserError(f"claim {claim.name}: {arm} has no metric {metric!r} for test index {idx}; it has "
                                f"{', '.join(available_metrics(records[idx]))}")
            out.append(value)
    return pairs_t, pairs_c


def metric_label(metric: str, records: dict[int, dict], attacks: dict[str, dict]) -> str:
    """`attacks`: the treatment arm's attack settings by key (its summary's)."""
    if metric == "clean":
        return "clean"
    if metric.startswith(CERTIFIED_PREFIX):
        sigma = next(iter(records.values()))["certify"]["sigma"]
        return f"certified r={metric[len(CERTIFIED_PREFIX):]} (σ={sigma:g})"
    return attack_label(attacks[metric])


def compare_claim(claim: ClaimConfig, alpha: float) -> list[dict]:
    """One row per metric: both arms' accuracies (95% Clopper-Pearson), the difference in
    points, the discordant counts, the exact McNemar p-value and the verdict."""
    from robustmim.eval.report import load_summary
    from robustmim.eval.summary import accuracy

    treatment, control = load_records(claim.treatment), load_records(claim.control)
    if not treatment or not control:
        raise UserError(f"claim {claim.name}: {claim.treatment if not treatment else claim.control} has no records")
    attacks = load_summary(claim.treatment).get("attacks", {})
    rows = []
    for metric in claim.metrics:
        key = resolve_metric(claim, metric, treatment, control)
        pairs_t, pairs_c = paired(claim, treatment, control, key)
        test = mcnemar_exact(pairs_t, pairs_c)
        arm_t, arm_c = accuracy(sum(pairs_t), len(pairs_t)), accuracy(sum(pairs_c), len(pairs_c))
        rows.append({"metric": metric, "key": key, "label": metric_label(key, treatment, attacks), "n": len(pairs_t),
                     "treatment": arm_t, "control": arm_c,
                     "difference": arm_t["accuracy"] - arm_c["accuracy"], **test, "verdict": verdict(test, alpha)})
    return rows


def claim_section(claim: ClaimConfig, rows: list[dict]) -> str:
    from robustmim.eval.report import percent

    lines = [f"### {claim.name}", ""]
    if claim.claim:
        lines += [f"Claim: {claim.claim}", ""]
    lines += [f"Treatment `{claim.treatment}` vs control `{claim.control}`, the same {rows[0]['n']} test images.", "",
              "| metric | treatment | control | difference (pts) | treatment only / control only | p (exact McNemar) "
              "| verdict |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {percent(row['treatment'])} | {percent(row['control'])} | "
                     f"{100 * row['difference']:+.1f} | {row['treatment_only']} / {row['control_only']} | "
                     f"{row['p_value']:.3g} | **{row['verdict']}** |")
    return "\n".join(lines) + "\n"


def run_study(cfg: StudyConfig, now: datetime.datetime | None = None) -> dict:
    """Compare every claim, write the markdown report (plus the plots of all arms) and a JSON of
    every number beside it; returns that JSON's content."""
    from robustmim.eval.report import load_summary, summaries_table, write_plots

    if not cfg.claims:
        raise UserError("the study has no claims")
    out = Path(cfg.out)
    plots_dir = out.with_suffix("")
    plots_dir.mkdir(parents=True, exist_ok=True)
    results = {claim.name: compare_claim(claim, cfg.alpha) for claim in cfg.claims}
    arms = list(dict.fromkeys(d for c in cfg.claims for d in (c.treatment, c.control)))
    summaries = [(Path(d).name, load_summary(d)) for d in arms]
    plots = write_plots(summaries, plots_dir)
    when = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    verdicts = [f"| {name} | {row['label']} | {100 * row['difference']:+.1f} | {row['p_value']:.3g} | "
                f"{row['verdict']} |" for name, rows in results.items() for row in rows]
    text = "\n".join([
        f"# {cfg.title}", "",
        f"Produced by `{cfg.produced_by}` on {when}.", "",
        "Each claim is a controlled pair: two arms with the same data, budget, test images and attack, differing "
        "only in what the claim is about. Accuracies in % with 95% Clopper-Pearson intervals. The paired test is "
        "the exact McNemar test on the per-sample records (only images right in one arm and wrong in the other "
        f"count); verdicts at the two-sided {cfg.alpha:g} level: **holds** (treatment more accurate), "
        "**contradicted** (less accurate) or **not significant**.", "",
        "## Verdicts", "", "| claim | metric | difference (pts) | p | verdict |", "|---|---|---|---|---|",
        *verdicts, "", "## Claims", "",
        *[claim_section(claim, results[claim.name]) for claim in cfg.claims],
        "## Every arm", "", summaries_table(summaries),
        *[f"![{p.stem}]({plots_dir.name}/{p.name})" for p in plots], ""])
    atomic_write_text(out, text)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"produced_by": cfg.produced_by, "date": when,
                                                           "alpha": cfg.alpha, "claims": results}, indent=1) + "\n")
    return results

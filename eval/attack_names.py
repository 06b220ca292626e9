"""What an attack's results are called: their fields, their records key, their label.

Every attack result of an evaluation is described by fields (attack, norm, loss or suite,
epsilon, steps, step size, restarts, random start, EOT draws, vote draws, targets, queries),
stored in the evaluation's plan and summary. The records key is built from every one of those
fields, so two attacks that differ in any setting never share a key and never overwrite each
other's results. Readers (summary, report, study) take the fields, never parse the key.

A key reads `<head>_<settings>`, e.g. pgd10_linf_ce_eps0.05_step0.0125_restarts1_eot8_votes8,
whose head (pgd10_linf_ce_eps0.05: attack and steps, norm, loss, epsilon) is the short name a
study may use while it names one attack of the evaluation.
"""

from __future__ import annotations

from robustmim.eval.config import AutoAttackConfig, AutoAttackVersion, EvalConfig, PGDConfig
from robustmim.errors import UserError

# (field, its tag in the key); a field the attack does not have is left out of its key
KEYED_SETTINGS = (("step_size", "step"), ("restarts", "restarts"), ("eot", "eot"), ("score_draws", "votes"),
                  ("targets", "targets"), ("square_queries", "queries"))
# The third part of the head for the whole AutoAttack suite: the version (apgd's suite kept its first name)
SUITE_HEAD = {AutoAttackVersion.standard.value: "standard", AutoAttackVersion.rand.value: "rand",
              AutoAttackVersion.apgd.value: "cascade"}
ATTACK_NAMES = {"pgd": "PGD", "apgdce": "APGD-CE"}
SUITE_LABELS = {"standard": "AutoAttack standard", "rand": "AutoAttack rand", "apgd": "APGD-CE+T"}


def pgd_fields(cfg: PGDConfig, epsilon: float) -> dict:
    return {"attack": "pgd", "norm": cfg.norm.value, "loss": cfg.loss.value, "epsilon": epsilon, "steps": cfg.steps,
            "step_size": cfg.step_for(epsilon), "restarts": cfg.restarts, "random_start": cfg.random_start,
            "eot": cfg.eot, "score_draws": cfg.score_draws}


def autoattack_fields(cfg: AutoAttackConfig, part: str) -> dict:
    """part: "aa" (the whole suite) or "apgdce" (its first attack alone, kept by versions rand and apgd)."""
    fields = {"attack": part, "suite": cfg.version.value, "norm": cfg.norm.value,
              "loss": "ce" if part == "apgdce" else None, "epsilon": cfg.epsilon, "steps": cfg.steps}
    if cfg.version is AutoAttackVersion.standard:  # torchattacks' deterministic suite: no EOT, no votes
        return {**fields, "targets": cfg.targets, "square_queries": cfg.square_queries}
    if cfg.version is AutoAttackVersion.apgd and part == "aa":
        fields["targets"] = cfg.targets
    return {**fields, "eot": cfg.eot, "score_draws": cfg.score_draws}


def attack_head(fields: dict) -> str:
    """pgd10_linf_ce_eps0.05: attack and steps, norm, loss (or the suite), epsilon."""
    third = fields["loss"] or SUITE_HEAD[fields["suite"]]
    return f"{fields['attack']}{fields['steps']}_{fields['norm']}_{third}_eps{fields['epsilon']:.4g}"


def attack_key(fields: dict) -> str:
    tail = [f"{tag}{fields[name]:.4g}" for name, tag in KEYED_SETTINGS if name in fields]
    if fields.get("random_start") is False:
        tail.append("nostart")
    return "_".join([attack_head(fields), *tail])


def planned_attacks(cfg: EvalConfig) -> dict[str, dict]:
    """Every attack result the evaluation records, by key, in the order they run; an attack
    configured twice with every setting equal is refused (its results would share one key)."""
    planned: dict[str, dict] = {}
    entries = [(f"attacks.{n}", pgd_fields(a, e)) for n, a in enumerate(cfg.attacks) for e in a.epsilons]
    if cfg.autoattack.enabled:
        parts = ["aa"] if cfg.autoattack.version is AutoAttackVersion.standard else ["apgdce", "aa"]
        entries += [("autoattack", autoattack_fields(cfg.autoattack, part)) for part in parts]
    for where, fields in entries:
        key = attack_key(fields)
        if key in planned:
            raise UserError(f"{where}: {key} is configured twice with the same settings; remove one")
        planned[key] = fields
    return planned


def resolve_attack(name: str, keys) -> str | None:
    """The key of `keys` that `name` names: the key itself, or its head when only one key has
    that head; None when none does. Several keys with that head: an error listing them."""
    keys = list(keys)
    if name in keys:
        return name
    matching = [key for key in keys if key.startswith(name + "_")]
    if len(matching) > 1:
        raise UserError(f"{name!r} names {len(matching)} attacks that differ in their settings: "
                        f"{', '.join(matching)}; give the whole key")
    return matching[0] if matching else None


def in_255ths(epsilon: float) -> bool:
    """Whether epsilon is a whole number of 255ths (ImageNet's and CIFAR's 8/255 style), so it
    reads best that way; other values (Fashion-MNIST's 0.05, 0.1) read as they are."""
    return abs(epsilon * 255 - round(epsilon * 255)) < 0.01


def epsilon_text(norm: str, epsilon: float) -> str:
    return f"{round(epsilon * 255)}/255" if norm == "linf" and in_255ths(epsilon) else f"{epsilon:g}"


def attack_label(fields: dict, detailed: bool = False) -> str:
    """PGD-10 L∞ ε=8/255 (ce); AutoAttack standard (100 steps) L∞ ε=4/255; APGD-CE+T-50 L∞ ε=0.05
    (cascade). `detailed` adds every other setting, to tell apart attacks whose short labels match."""
    norm = "L∞" if fields["norm"] == "linf" else "L2"
    eps = epsilon_text(fields["norm"], fields["epsilon"])
    details = []
    if detailed:
        details = [f"{tag} {fields[name]:.4g}" for name, tag in KEYED_SETTINGS if name in fields]
        details += ["no random start"] if fields.get("random_start") is False else []
    if fields["attack"] == "aa" and fields["suite"] in ("standard", "rand"):
        steps = ", ".join([f"{fields['steps']} steps", *details])
        return f"{SUITE_LABELS[fields['suite']]} ({steps}) {norm} ε={eps}"
    name = ATTACK_NAMES.get(fields["attack"]) or SUITE_LABELS[fields["suite"]]
    loss = ", ".join([fields["loss"] or SUITE_HEAD[fields["suite"]], *details])
    return f"{name}-{fields['steps']} {norm} ε={eps} ({loss})"


def attack_labels(attacks: dict[str, dict]) -> dict[str, str]:
    """A label per key: the short label, or the detailed one where different keys share it."""
    short = {key: attack_label(fields) for key, fields in attacks.items()}
    shared = {label for label in short.values() if list(short.values()).count(label) > 1}
    return {key: attack_label(attacks[key], detailed=True) if short[key] in shared else short[key]
            for key in attacks}

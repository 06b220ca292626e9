"""AutoAttack's standard suite (Croce & Hein 2020), as RobustBench and MIMIR report it: APGD-CE,
APGD-T, FAB-T and Square, each on the samples every earlier attack left robust.

The attacks are torchattacks' (maintained ports of AutoAttack's code), composed here with
AutoAttack's settings: `steps` iterations for APGD and FAB (100), `targets` target classes for
APGD-T and FAB-T (9), `square_queries` for Square (5,000). torchattacks' own AutoAttack class is
not used: it leaves APGD and FAB at their 10-iteration defaults.

For deterministic models only: the suite's random starts are drawn for the whole batch from
torch's global generator (seeded per batch from the eval seed and the batch's first index), so a
sample's result can depend on the batch it was in. Randomized models take version rand, whose
draws are per sample (eval/apgd.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from robustmim.errors import UserError
from robustmim.eval.attacks import perturbation_size
from robustmim.eval.config import AutoAttackConfig, Norm
from robustmim.eval.model import EvalModel


class DeterministicLogits(nn.Module):
    """The deployed classifier as torchattacks calls it: [0, 1] images in, fp32 logits out."""

    def __init__(self, model: EvalModel):
        super().__init__()
        self.evaluated, self.network = model, model.module  # network: its parameters locate the device

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.evaluated.forward(images01, None)


def standard_autoattack(model: EvalModel, clean: torch.Tensor, labels: torch.Tensor, cfg: AutoAttackConfig,
                        seed: int) -> dict[str, torch.Tensor]:
    """{"pred", "correct", "distance"} after the whole suite, as PGD's results."""
    if model.randomized:
        raise UserError(f"autoattack.version=standard is for deterministic models; this {model.spec.defense.value} "
                        f"model is randomized: use autoattack.version=rand (APGD-CE and APGD-DLR with EOT)")
    import torchattacks

    network = DeterministicLogits(model).eval()
    norm = "Linf" if cfg.norm is Norm.linf else "L2"
    targets = min(cfg.targets, model.num_classes - 1)
    apgd_t = torchattacks.APGDT(network, norm=norm, eps=cfg.epsilon, steps=cfg.steps, seed=seed,
                                n_classes=model.num_classes)
    fab_t = torchattacks.FAB(network, norm=norm, eps=cfg.epsilon, steps=cfg.steps, seed=seed, multi_targeted=True,
                             n_classes=model.num_classes)
    for attack in (apgd_t, fab_t):
        attack.n_target_classes = targets  # the top `targets` other classes (both default to all of them)
    suite = torchattacks.MultiAttack([
        torchattacks.APGD(network, norm=norm, eps=cfg.epsilon, steps=cfg.steps, seed=seed, loss="ce"),
        apgd_t, fab_t,
        torchattacks.Square(network, norm=norm, eps=cfg.epsilon, n_queries=cfg.square_queries, seed=seed)])
    adv = suite(clean, labels).detach()
    with torch.no_grad():
        pred = network(adv).argmax(-1)
    return {"pred": pred, "correct": pred == labels, "distance": perturbation_size(adv, clean, cfg.norm)}

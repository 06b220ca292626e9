"""AutoAttack's APGD (Croce & Hein 2020) and the suites built from it: APGD-CE, then on the samples
still robust either APGD-T (targeted DLR loss, the top `targets` other classes in turn; version
apgd) or APGD-DLR (untargeted; version rand, AutoAttack's suite for randomized models). Our
implementation: every draw (noise, random start) comes from the sample's own generator, so a
sample's result does not depend on its batch or rank, and EOT (the loss averaged over draws)
serves randomized models. The standard suite (with FAB-T and Square) is eval/autoattack.py.

APGD, as AutoAttack's: step size 2 epsilon, momentum 0.75 (the previous move, kept across a step
halving), and at the checkpoints p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
0.06) the step of a sample is halved (and it restarts from its best point) if at most rho = 0.75
of its steps since the last checkpoint raised the loss, or if its step was not halved last time
and its best loss has not improved since.

A run returns, for a deterministic model, its first misclassified iterate, else its iterate of
highest loss (AutoAttack's choice). For a randomized model the candidates (highest EOT loss, last,
first misclassified by a majority of the EOT draws) are scored by the same majority vote as PGD's
images, and the first the vote misclassifies is kept. (Returning the first iterate that one draw
happened to misclassify kept images that the vote still classified correctly: on a randomized
model APGD then came out weaker than PGD.)
"""

from __future__ import annotations

from typing import Callable

import torch

from robustmim.pipeline.attacks import normalized_l2, project_l2, project_linf
from robustmim.eval.attacks import perturbation_size, random_start
from robustmim.eval.config import AutoAttackConfig, AutoAttackVersion, Norm
from robustmim.eval.model import EvalModel
from robustmim.eval.sampling import ATTACK
from robustmim.pipeline.randomness import sample_generator

APGD_PURPOSE = 100  # separates APGD's draws from PGD's (ATTACK, attack number, ...)


def checkpoints(steps: int) -> list[int]:
    """Iterations at which step sizes are reviewed: the first after 22% of the steps, then
    intervals shrinking by 3% of the steps down to 6% (the schedule p_j in whole iterations)."""
    interval, shrink, floor = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    marks, at = [], 0
    while at + interval <= steps:
        at += interval
        marks.append(at)
        interval = max(interval - shrink, floor)
    return marks


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, target=None) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")


def dlr_targeted(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2): scale-invariant, needs >= 4 classes."""
    z = logits.float()
    ordered = z.sort(dim=1, descending=True).values
    own, other = z.gather(1, labels.view(-1, 1)).squeeze(1), z.gather(1, target.view(-1, 1)).squeeze(1)
    return -(own - other) / (ordered[:, 0] - (ordered[:, 2] + ordered[:, 3]) / 2 + 1e-12)


def dlr_untargeted(logits: torch.Tensor, labels: torch.Tensor, target=None) -> torch.Tensor:
    """-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3): scale-invariant, needs >= 3 classes."""
    z = logits.float()
    ordered = z.sort(dim=1, descending=True).values
    own = z.gather(1, labels.view(-1, 1)).squeeze(1)
    best_other = z.masked_fill(torch.nn.functional.one_hot(labels, z.shape[1]).bool(), float("-inf")).max(1).values
    return -(own - best_other) / (ordered[:, 0] - ordered[:, 2] + 1e-12)


def apgd(model: EvalModel, clean: torch.Tensor, labels: torch.Tensor, cfg: AutoAttackConfig,
         loss_of: Callable, target, generators, rho: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """(adversarial images, their predictions by the majority vote) for one APGD run on the batch."""
    eps, steps = cfg.epsilon, cfg.steps
    project_onto = project_linf if cfg.norm is Norm.linf else project_l2
    project = lambda x: project_onto(x, clean, eps)  # noqa: E731
    direction = torch.sign if cfg.norm is Norm.linf else normalized_l2
    view = (-1,) + (1,) * (clean.dim() - 1)

    def loss_and_grad(x):
        return model.mean_loss_and_grad(x, labels, generators, cfg.eot, lambda logits: loss_of(logits, labels, target))

    step = torch.full((clean.shape[0],), 2 * eps, device=clean.device)
    x = random_start(clean, cfg.norm, eps, generators)
    loss, grad, fooled = loss_and_grad(x)
    found, x_found = fooled.clone(), x.clone()
    best_loss, x_best, grad_best = loss.clone(), x.clone(), grad.clone()
    x_prev, previous_loss = x.clone(), loss.clone()
    raised = torch.zeros_like(step)
    reduced_last = torch.ones_like(labels, dtype=torch.bool)
    loss_at_check, last_check = best_loss.clone(), 0
    marks = set(checkpoints(steps))
    for k in range(steps):
        z = project(x + step.view(view) * direction(grad))
        momentum = 0.75 if k > 0 else 1.0
        x_new = project(x + momentum * (z - x) + (1 - momentum) * (x - x_prev))
        x_prev, x = x, x_new
        loss, grad, fooled = loss_and_grad(x)
        newly = fooled & ~found
        x_found = torch.where(newly.view(view), x, x_found)
        found |= fooled
        raised += (loss > previous_loss).float()
        previous_loss = loss
        better = loss > best_loss
        best_loss = torch.where(better, loss, best_loss)
        x_best = torch.where(better.view(view), x, x_best)
        grad_best = torch.where(better.view(view), grad, grad_best)
        if k + 1 in marks:
            few_raises = raised <= rho * (k + 1 - last_check)
            stalled = ~reduced_last & (loss_at_check >= best_loss)
            reduce = few_raises | stalled
            step = torch.where(reduce, step / 2, step)
            x = torch.where(reduce.view(view), x_best, x)
            grad = torch.where(reduce.view(view), grad_best, grad)
            reduced_last, loss_at_check, last_check = reduce, best_loss.clone(), k + 1
            raised.zero_()
    if not model.randomized:  # a misclassified iterate stays misclassified: AutoAttack's choice
        adv = torch.where(found.view(view), x_found, x_best).detach()
        return adv, model.vote(adv, generators, 1)
    # Randomized: what the EOT draws of one iterate saw is noise. The candidates (the iterate of
    # highest EOT loss, the last iterate, the first iterate a majority of draws misclassified) are
    # scored by the majority vote, as PGD's image is; the first the vote misclassifies is kept.
    adv, pred = x_best.detach(), model.vote(x_best, generators, cfg.score_draws)
    for candidate, eligible in ((x, None), (x_found, found)):
        candidate_pred = model.vote(candidate, generators, cfg.score_draws)
        take = (pred == labels) & (candidate_pred != labels)
        take = take if eligible is None else take & eligible
        adv, pred = torch.where(take.view(view), candidate.detach(), adv), torch.where(take, candidate_pred, pred)
    return adv, pred


def autoattack(model: EvalModel, clean: torch.Tensor, labels: torch.Tensor, indices: list[int], cfg: AutoAttackConfig,
               seed: int, compact: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """The configured suite: {"aa": ...} and, for our versions, {"apgd-ce": ...}, each {"pred",
    "correct", "distance"} as PGD's. Versions rand and apgd: APGD-CE on every sample, then each
    later run (APGD-DLR, or one APGD-T per target) on the samples still robust. With `compact`, a
    later run attacks only those samples; without, it attacks all and keeps the same images:
    every draw is per sample, so the results are identical."""
    from robustmim.eval.attacks import attacked_rows

    if cfg.version is AutoAttackVersion.standard:
        from robustmim.eval.autoattack import standard_autoattack

        return {"aa": standard_autoattack(model, clean, labels, cfg, seed + indices[0])}
    device = clean.device
    view = (-1,) + (1,) * (clean.dim() - 1)
    generators = [sample_generator(seed, i, ATTACK, APGD_PURPOSE, device=device) for i in indices]
    adv, pred = apgd(model, clean, labels, cfg, ce_loss, None, generators)
    size = perturbation_size(adv, clean, cfg.norm)
    results = {"apgd-ce": {"pred": pred, "correct": pred == labels, "distance": size}}
    final_adv, final_pred, robust = adv.clone(), pred.clone(), pred == labels
    with torch.no_grad():
        ranking = model.mean_log_probs(clean, generators, cfg.score_draws).argsort(dim=1, descending=True)
    others = ranking[ranking != labels.view(-1, 1)].view(len(labels), -1)  # most likely other classes first
    later_runs = 1 if cfg.version is AutoAttackVersion.rand else min(cfg.targets, model.num_classes - 1)
    for number in range(later_runs):
        rows = attacked_rows(robust, compact)
        if rows.numel() == 0:
            break
        # a fresh generator per (sample, run): a sample's draws do not depend on which runs it skipped
        target_generators = [sample_generator(seed, indices[r], ATTACK, APGD_PURPOSE, 1 + number, device=device)
                             for r in rows.tolist()]
        if cfg.version is AutoAttackVersion.rand:
            loss_of, target = dlr_untargeted, None
        else:
            loss_of, target = dlr_targeted, others[rows, number]
        adv_t, pred_t = apgd(model, clean[rows], labels[rows], cfg, loss_of, target, target_generators)
        switch = robust[rows] & (pred_t != labels[rows])  # only samples still robust take the new image
        final_adv[rows] = torch.where(switch.view(view), adv_t, final_adv[rows])
        final_pred[rows] = torch.where(switch, pred_t, final_pred[rows])
        robust[rows] &= ~switch
    results["aa"] = {"pred": final_pred, "correct": robust,
                     "distance": perturbation_size(final_adv, clean, cfg.norm)}
    return results


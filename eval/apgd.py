"""An AutoAttack-style run (Croce & Hein 2020): APGD-CE, then APGD-T (targeted DLR loss, the
top `targets` other classes in turn) on the samples still robust. Our implementation, with
every draw from the sample's generator, and EOT (the loss averaged over draws) for randomized
models as AutoAttack's 'rand' version. FAB-T and Square are not included.

APGD: step size 2 epsilon, momentum 0.75, and at the checkpoints p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) the step of a sample is halved (and it restarts
from its best point) if fewer than rho = 0.75 of its steps since the last checkpoint raised the
loss, or if its step was not halved last time and its best loss has not improved since.
"""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.attacks import normalized_l2, project_l2, project_linf
from eval.attacks import random_start
from eval.config import AutoAttackConfig, Norm
from eval.model import EvalModel
from eval.sampling import ATTACK, sample_generator

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


def apgd(model: EvalModel, clean: torch.Tensor, labels: torch.Tensor, cfg: AutoAttackConfig,
         loss_of: Callable, target, generators, rho: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """(adversarial images, fooled-at-some-iterate flags) for one APGD run on the batch."""
    eps, steps = cfg.epsilon, cfg.steps
    project = (lambda x: project_linf(x, clean, eps)) if cfg.norm is Norm.linf else (lambda x: project_l2(x, clean, eps))
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
            few_raises = raised < rho * (k + 1 - last_check)
            stalled = ~reduced_last & (loss_at_check >= best_loss)
            reduce = few_raises | stalled
            step = torch.where(reduce, step / 2, step)
            x = torch.where(reduce.view(view), x_best, x)
            x_prev = torch.where(reduce.view(view), x_best, x_prev)
            grad = torch.where(reduce.view(view), grad_best, grad)
            reduced_last, loss_at_check, last_check = reduce, best_loss.clone(), k + 1
            raised.zero_()
    return torch.where(found.view(view), x_found, x_best).detach(), found


def autoattack(model: EvalModel, clean: torch.Tensor, labels: torch.Tensor, indices: list[int], cfg: AutoAttackConfig,
               seed: int, compact: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """{"apgd-ce": ..., "aa": ...}, each {"pred", "correct", "distance"} as PGD's: APGD-CE on
    every sample, then each APGD-T target run on the samples still robust (the cascade). With
    `compact`, a target run attacks only those samples; without, it attacks all and keeps the
    same images: every draw is per sample, so the results are identical."""
    from eval.attacks import attacked_rows

    device = clean.device
    view = (-1,) + (1,) * (clean.dim() - 1)
    generators = [sample_generator(seed, i, ATTACK, APGD_PURPOSE, device=device) for i in indices]
    adv, _ = apgd(model, clean, labels, cfg, ce_loss, None, generators)
    pred = model.vote(adv, generators, cfg.score_draws)
    results = {"apgd-ce": {"pred": pred, "correct": pred == labels, "distance": distance(adv, clean, cfg.norm)}}
    final_adv, final_pred, robust = adv.clone(), pred.clone(), pred == labels
    with torch.no_grad():
        ranking = model.mean_log_probs(clean, generators, cfg.score_draws).argsort(dim=1, descending=True)
    others = ranking[ranking != labels.view(-1, 1)].view(len(labels), -1)  # most likely other classes first
    for number in range(min(cfg.targets, model.num_classes - 1)):
        rows = attacked_rows(robust, compact)
        if rows.numel() == 0:
            break
        # a fresh generator per (sample, target): a sample's draws do not depend on which runs it skipped
        target_generators = [sample_generator(seed, indices[r], ATTACK, APGD_PURPOSE, 1 + number, device=device)
                             for r in rows.tolist()]
        adv_t, _ = apgd(model, clean[rows], labels[rows], cfg, dlr_targeted, others[rows, number], target_generators)
        pred_t = model.vote(adv_t, target_generators, cfg.score_draws)
        switch = robust[rows] & (pred_t != labels[rows])  # only samples still robust take the new image
        final_adv[rows] = torch.where(switch.view(view), adv_t, final_adv[rows])
        final_pred[rows] = torch.where(switch, pred_t, final_pred[rows])
        robust[rows] &= ~switch
    results["aa"] = {"pred": final_pred, "correct": robust, "distance": distance(final_adv, clean, cfg.norm)}
    return results


def distance(adv: torch.Tensor, clean: torch.Tensor, norm: Norm) -> torch.Tensor:
    delta = (adv - clean).flatten(1)
    return delta.abs().max(dim=1).values if norm is Norm.linf else delta.norm(dim=1)

"""PGD in L-inf and L2 against the deployed model, end to end (De³'s denoiser included), with
EOT over noise draws for randomized models, random starts, restarts and CE or margin loss.

A sample counts as robust at epsilon only if no restart finds an adversarial image whose
majority vote (over `score_draws` fresh draws) differs from its label. Every draw of sample
i comes from its own generator, so results do not depend on batching or rank count.
"""

from __future__ import annotations

import torch

from pipeline.attacks import normalized_l2, project_l2, project_linf
from eval.config import AttackLoss, Norm, PGDConfig
from eval.model import EvalModel
from eval.sampling import ATTACK, per_sample_normal, per_sample_uniform, sample_generator


def attack_loss(log_probs: torch.Tensor, labels: torch.Tensor, kind: AttackLoss) -> torch.Tensor:
    """[B] losses to ascend."""
    own = log_probs.gather(1, labels.view(-1, 1)).squeeze(1)
    if kind is AttackLoss.ce:
        return -own
    others = log_probs.masked_fill(torch.nn.functional.one_hot(labels, log_probs.shape[1]).bool(), float("-inf"))
    return others.max(dim=1).values - own  # > 0 once another class wins


def random_start(clean: torch.Tensor, norm: Norm, epsilon: float, generators) -> torch.Tensor:
    shape = tuple(clean.shape[1:])
    if norm is Norm.linf:
        delta = (per_sample_uniform(generators, shape, clean.device) * 2 - 1) * epsilon
        return (clean + delta).clamp(0, 1)
    direction = normalized_l2(per_sample_normal(generators, shape, clean.device))
    radius = per_sample_uniform(generators, (1,) * len(shape), clean.device) * epsilon
    return project_l2(clean + direction * radius, clean, epsilon)


def pgd_run(model: EvalModel, clean: torch.Tensor, labels: torch.Tensor, cfg: PGDConfig, epsilon: float,
            generators) -> torch.Tensor:
    """One PGD run from a random start (or the clean image); returns the last iterate."""
    step = cfg.step_for(epsilon)
    adv = random_start(clean, cfg.norm, epsilon, generators) if cfg.random_start else clean.clone()
    for _ in range(cfg.steps):
        adv.requires_grad_(True)
        loss = attack_loss(model.mean_log_probs(adv, generators, cfg.eot), labels, cfg.loss).sum()
        grad, = torch.autograd.grad(loss, adv)
        adv = adv.detach()
        if cfg.norm is Norm.linf:
            adv = project_linf(adv + step * grad.sign(), clean, epsilon)
        else:
            adv = project_l2(adv + step * normalized_l2(grad), clean, epsilon)
    return adv.detach()


def pgd_attack(model: EvalModel, clean: torch.Tensor, labels: torch.Tensor, indices: list[int], cfg: PGDConfig,
               attack_number: int, epsilon_number: int, seed: int) -> dict:
    """Worst case over restarts: {"pred": [B], "correct": [B] bool, "distance": [B]} on the device."""
    epsilon = cfg.epsilons[epsilon_number]
    correct = torch.ones_like(labels, dtype=torch.bool)
    final_pred = labels.clone()
    distance = torch.zeros(labels.shape[0], device=clean.device)
    for restart in range(cfg.restarts):
        generators = [sample_generator(seed, i, ATTACK, attack_number, epsilon_number, restart, device=clean.device)
                      for i in indices]
        adv = pgd_run(model, clean, labels, cfg, epsilon, generators)
        pred = model.vote(adv, generators, cfg.score_draws)
        fooled = correct & (pred != labels)  # the first successful restart's image is kept
        final_pred = torch.where(fooled | (restart == 0), pred, final_pred)
        delta = (adv - clean).flatten(1)
        size = delta.abs().max(dim=1).values if cfg.norm is Norm.linf else delta.norm(dim=1)
        distance = torch.where(fooled | (restart == 0), size, distance)
        correct = correct & (pred == labels)
    return {"pred": final_pred, "correct": correct, "distance": distance}

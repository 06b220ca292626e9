"""PGD in L-inf and L2 against the deployed model, end to end (De³'s denoiser included), with
EOT over noise draws for randomized models, random starts, restarts and CE or margin loss.

A sample counts as robust at epsilon only if no restart finds an adversarial image whose
majority vote (over `score_draws` fresh draws) differs from its label. Every draw of sample
i comes from its own generator, so results do not depend on batching or rank count.
"""

from __future__ import annotations

import torch

from robustmim.pipeline.attacks import normalized_l2, pgd, project_l2, uniform_linf_start
from robustmim.eval.config import AttackLoss, Norm, PGDConfig
from robustmim.eval.model import EvalModel
from robustmim.eval.sampling import ATTACK
from robustmim.pipeline.randomness import per_sample_normal, per_sample_uniform, sample_generator


def attack_loss(log_probs: torch.Tensor, labels: torch.Tensor, kind: AttackLoss) -> torch.Tensor:
    """[B] losses to ascend."""
    own = log_probs.gather(1, labels.view(-1, 1)).squeeze(1)
    if kind is AttackLoss.ce:
        return -own
    others = log_probs.masked_fill(torch.nn.functional.one_hot(labels, log_probs.shape[1]).bool(), float("-inf"))
    return others.max(dim=1).values - own  # > 0 once another class wins


def random_start(clean: torch.Tensor, norm: Norm, epsilon: float, generators) -> torch.Tensor:
    """A uniform point of the L-inf ball, or a point of the L2 ball at a uniform radius along a
    uniform direction, each sample's from its own generator."""
    shape = tuple(clean.shape[1:])
    if norm is Norm.linf:
        return uniform_linf_start(clean, epsilon, per_sample_uniform(generators, shape, clean.device))
    direction = normalized_l2(per_sample_normal(generators, shape, clean.device))
    radius = per_sample_uniform(generators, (1,) * len(shape), clean.device) * epsilon
    return project_l2(clean + direction * radius, clean, epsilon)


def pgd_run(model: EvalModel, clean: torch.Tensor, labels: torch.Tensor, cfg: PGDConfig, epsilon: float,
            generators) -> torch.Tensor:
    """One PGD run from a random start (or the clean image); returns the last iterate."""
    start = random_start(clean, cfg.norm, epsilon, generators) if cfg.random_start else clean

    def grad_of(adv: torch.Tensor) -> torch.Tensor:
        return model.eot_loss_and_grad(adv, generators, cfg.eot, lambda log_probs: attack_loss(log_probs, labels,
                                                                                             cfg.loss))[1]

    return pgd(grad_of, clean, start, cfg.norm.value, epsilon, cfg.step_for(epsilon), cfg.steps)


def perturbation_size(adv: torch.Tensor, clean: torch.Tensor, norm: Norm) -> torch.Tensor:
    delta = (adv - clean).flatten(1)
    return delta.abs().max(dim=1).values if norm is Norm.linf else delta.norm(dim=1)


def attacked_rows(todo: torch.Tensor, compact: bool) -> torch.Tensor:
    """The batch rows to attack: those in `todo` (one host read), or every row."""
    return todo.nonzero().squeeze(1) if compact else torch.arange(todo.shape[0], device=todo.device)


def pgd_attack(model: EvalModel, clean: torch.Tensor, labels: torch.Tensor, indices: list[int], cfg: PGDConfig,
               attack_number: int, seed: int, compact: bool = True) -> list[dict]:
    """For each of cfg.epsilons (in their order) the worst case over restarts: {"pred": [B],
    "correct": [B] bool, "distance": [B]} on the device.

    A sample is robust at epsilon if no restart fools it; the first fooling restart's image is
    kept. A sample fooled at a smaller epsilon is fooled at every larger one by the same image
    (it lies in the larger ball too). With `compact`, later restarts and larger epsilons attack
    only the samples still robust; every draw is the sample's own, so the records are the same
    as attacking all and keeping the same images (compact=false), only cheaper."""
    count = labels.shape[0]
    results: list[dict] = [{} for _ in cfg.epsilons]
    fooled_before = torch.zeros_like(labels, dtype=torch.bool)  # at a smaller epsilon
    carried_pred, carried_size = labels.clone(), torch.zeros(count, device=clean.device)
    for eps_number in sorted(range(len(cfg.epsilons)), key=lambda n: cfg.epsilons[n]):
        epsilon = cfg.epsilons[eps_number]
        correct = ~fooled_before
        pred, size = carried_pred.clone(), carried_size.clone()
        for restart in range(cfg.restarts):
            rows = attacked_rows(correct, compact)
            if rows.numel() == 0:
                break
            generators = [sample_generator(seed, indices[r], ATTACK, attack_number, eps_number, restart,
                                           device=clean.device) for r in rows.tolist()]
            adv = pgd_run(model, clean[rows], labels[rows], cfg, epsilon, generators)
            rows_pred = model.vote(adv, generators, cfg.score_draws)
            # restart 0 sets every attacked sample's result; a later one replaces it when it fools
            take = correct[rows] & ((rows_pred != labels[rows]) | (restart == 0))
            pred[rows] = torch.where(take, rows_pred, pred[rows])
            size[rows] = torch.where(take, perturbation_size(adv, clean[rows], cfg.norm), size[rows])
            correct[rows] &= rows_pred == labels[rows]
        results[eps_number] = {"pred": pred, "correct": correct, "distance": size}
        fooled_before, carried_pred, carried_size = ~correct, pred, size
    return results

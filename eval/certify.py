"""Randomized smoothing: Cohen et al.'s CERTIFY and PREDICT, batched on the device.

The base classifier gets x + sigma * N(0, I) on the [0, 1] input (no clipping; it normalizes
inside). Selection and estimation draws come from two independent generators of the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from scipy.special import betaincinv
from scipy.stats import binomtest, norm

ABSTAIN = -1


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) lower confidence bound on a binomial proportion: the alpha-quantile
    of Beta(k, n - k + 1) (statsmodels' proportion_confint(k, n, 2 alpha, "beta")[0])."""
    if successes <= 0:
        return 0.0
    return float(betaincinv(successes, trials - successes + 1, alpha))


def largest_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The radius of a sample whose n draws all vote for one class: sigma * Phi^-1(alpha^(1/n)),
    the most CERTIFY can ever give with these n and alpha (e.g. 0.55 at sigma 0.25, n 500)."""
    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


@torch.no_grad()
def noisy_counts(classifier: nn.Module, image: torch.Tensor, sigma: float, num: int, batch: int,
                 generator: torch.Generator, num_classes: int) -> torch.Tensor:
    """[K] votes of the base classifier over `num` noisy copies of one [C, H, W] image."""
    counts = torch.zeros(num_classes, dtype=torch.long, device=image.device)
    remaining = num
    while remaining > 0:
        size = min(batch, remaining)
        noise = torch.randn((size, *image.shape), generator=generator, device=image.device, dtype=image.dtype)
        predictions = classifier(image.unsqueeze(0) + sigma * noise).argmax(-1)
        # scatter_add, not bincount: bincount on CUDA reads the largest value back to the host
        counts.scatter_add_(0, predictions, torch.ones_like(predictions))
        remaining -= size
    return counts


@dataclass
class Certificate:
    prediction: int  # ABSTAIN (-1) or a class
    radius: float  # certified L2 radius (0 when abstaining)
    count: int  # n_A: estimation votes for the selected class
    p_lower: float


def certify(classifier: nn.Module, image: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, batch: int,
            select: torch.Generator, estimate: torch.Generator, num_classes: int) -> Certificate:
    guess = int(noisy_counts(classifier, image, sigma, n0, batch, select, num_classes).argmax())
    count = int(noisy_counts(classifier, image, sigma, n, batch, estimate, num_classes)[guess])
    p_lower = clopper_pearson_lower(count, n, alpha)
    if p_lower < 0.5:
        return Certificate(ABSTAIN, 0.0, count, p_lower)
    return Certificate(guess, float(sigma * norm.ppf(p_lower)), count, p_lower)


def predict(classifier: nn.Module, image: torch.Tensor, sigma: float, n: int, alpha: float, batch: int,
            generator: torch.Generator, num_classes: int) -> int:
    """The smoothed prediction, or ABSTAIN when the top two counts are not separated at alpha."""
    counts = noisy_counts(classifier, image, sigma, n, batch, generator, num_classes)
    top2 = counts.topk(2)
    first, second = int(top2.values[0]), int(top2.values[1])
    if binomtest(first, first + second, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(top2.indices[0])

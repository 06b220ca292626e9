"""Every seeded draw of robustmim, and the contract that makes runs repeatable.

Training (pretraining, fine-tuning, the tokenizer): all draws of one micro-step (masks, noise
levels and noise, mixup / cutmix, random erasing, the random starts of MIMIR's and DAT's
attacks) come from one generator fixed by (seed, micro-step, rank): `step_generator`. A resumed
run draws exactly what the uninterrupted run drew at each step; another rank count changes the
draws, as it changes each rank's batch. Validation draws from (seed + a fixed offset, step,
rank), apart from training's draws. What torch's global generator still draws (timm's drop
path) is saved per rank in every checkpoint and restored on resume. The loader's shuffling and
augmentation are DALI's, seeded by (seed, rank) (pipeline/data/dali.py).

Evaluation: every draw for sample i comes from its own generator fixed by (seed, i, purpose...):
`sample_generator`. A sample's outcome depends neither on the batch it landed in, nor on the
number of ranks, nor on restarts.

Keys go through numpy's SeedSequence, so nearby keys ((seed, 1, 0) and (seed, 0, 1)) give
unrelated streams; SeedSequence ignores trailing zeros, though ((seed, i) and (seed, i, 0) are
one stream), so the keys of one kind of draw have one length, and kinds differ before their
last entry (eval's PGD keys (..., attack, epsilon, restart) count attacks from 0 and APGD's
start (..., 100): a configuration of 100 PGD attacks would share APGD's stream).

torch's samplers that take no generator (Gamma, Beta) are rebuilt here on generator draws.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def seeded_generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` whose stream is fixed by the integers of `key`."""
    state = np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state) & (2**63 - 1))
    return generator


def step_generator(seed: int, step: int, rank: int, device: torch.device | str) -> torch.Generator:
    """The generator of one training micro-step on one rank."""
    return seeded_generator(seed, step, rank, device=device)


# Validation's draws (De³'s and DMAE's noise) are keyed by (seed + this offset, step, rank): apart
# from the training draws of the same step.
VALIDATION_SEED_OFFSET = 7919


def validation_generator(seed: int, step: int, rank: int, device: torch.device | str) -> torch.Generator:
    """The generator of one rank's validation at a training step."""
    return seeded_generator(seed + VALIDATION_SEED_OFFSET, step, rank, device=device)


def sample_generator(seed: int, index: int, *purpose: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one evaluated sample's draws for one purpose (eval/sampling.py names them)."""
    return seeded_generator(seed, index, *purpose, device=device)


def gaussian_like(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise of the images' shape, device and dtype."""
    return torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)


def uniform_like(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """U[0, 1) draws of the images' shape, device and dtype."""
    return torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)


def per_sample_normal(generators: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    """[B, *shape]: one standard normal draw per sample, each from its own generator."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])


def per_sample_uniform(generators: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    """[B, *shape]: one U[0, 1) draw per sample, each from its own generator."""
    return torch.stack([torch.rand(shape, generator=g, device=device) for g in generators])


def sample_gamma(shape_k: float, scale: float, n: int, generator: torch.Generator, device,
                 rounds: int = 8) -> torch.Tensor:
    """n Gamma(shape_k, scale) draws from `generator` (torch's own Gamma sampler takes none).

    Marsaglia and Tsang's method with a fixed number of proposal rounds, so no host sync: a
    proposal is accepted with probability above 0.95 for shape >= 1 (0.996 at shape 25); a
    draw whose rounds all fail (probability < 0.05**8) falls back to the mode-like value d.
    Shapes below 1 use the boost Gamma(k) = Gamma(k + 1) * U**(1/k).
    """
    k = shape_k if shape_k >= 1 else shape_k + 1
    d = k - 1 / 3
    c = 1 / math.sqrt(9 * d)
    z = torch.randn(rounds, n, generator=generator, device=device)
    u = torch.rand(rounds, n, generator=generator, device=device)
    v = (1 + c * z) ** 3
    log_v = torch.log(v.clamp_min(1e-30))
    accepted = (v > 0) & (torch.log(u) < 0.5 * z**2 + d - d * v + d * log_v)
    first = accepted.int().argmax(dim=0, keepdim=True)
    draws = torch.where(accepted.any(dim=0), d * v.gather(0, first)[0], torch.full_like(v[0], d))
    if shape_k < 1:
        draws = draws * torch.rand(n, generator=generator, device=device) ** (1 / shape_k)
    return draws * scale


def sample_beta(alpha: float, generator: torch.Generator, device) -> torch.Tensor:
    """One Beta(alpha, alpha) draw as a 0-d tensor: G1 / (G1 + G2) with G ~ Gamma(alpha)."""
    g = sample_gamma(alpha, 1.0, 2, generator, device)
    return g[0] / (g[0] + g[1]).clamp_min(1e-12)

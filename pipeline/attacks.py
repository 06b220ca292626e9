"""Projected gradient attacks in [0, 1] pixel space, shared by training recipes (MIMIR's
self-adversarial pretraining, PGD adversarial fine-tuning) and the eval stage.

Every random start comes from the caller's generator; the loss function maps the model's
output to a scalar to ascend. Gradients are taken with respect to the input only, so parameter
gradients are untouched.
"""

from __future__ import annotations

from typing import Callable

import torch


def project_linf(adv: torch.Tensor, clean: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Into the L-inf ball of radius epsilon around `clean`, then into [0, 1]."""
    return torch.minimum(torch.maximum(adv, clean - epsilon), clean + epsilon).clamp(0, 1)


def pgd_linf(loss_of: Callable[[torch.Tensor], torch.Tensor], clean: torch.Tensor, epsilon: float,
             step_size: float, steps: int, random_start: bool, generator: torch.Generator) -> torch.Tensor:
    """Signed-gradient ascent of `loss_of(adv)` within the L-inf ball; returns a detached tensor."""
    adv = clean.detach()
    if random_start:
        start = torch.rand(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype) * 2 - 1
        adv = (adv + epsilon * start).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        grad, = torch.autograd.grad(loss_of(adv), adv)
        adv = project_linf(adv.detach() + step_size * grad.sign(), clean, epsilon)
    return adv.detach()


def project_l2(adv: torch.Tensor, clean: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Into the L2 ball of radius epsilon around `clean` (per sample), then into [0, 1]."""
    delta = adv - clean
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (clean.dim() - 1))
    return (clean + delta * torch.clamp(epsilon / norms, max=1.0)).clamp(0, 1)


def normalized_l2(grad: torch.Tensor) -> torch.Tensor:
    """Each sample's gradient scaled to unit L2 norm (the L2 steepest-ascent direction)."""
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))

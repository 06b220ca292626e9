"""Projected gradient ascent in [0, 1] pixel space: the one loop behind MIMIR's self-adversarial
pretraining, PGD adversarial fine-tuning, DAT's discrete adversarial step and the eval stage's
PGD, in L-inf and L2.

The caller draws the starting point (from its own generator: one per batch in training, one
per sample in evaluation) and gives the gradient of what it ascends: plain input gradients in
training (`input_gradient`), EOT-averaged ones through randomized models in evaluation.
Gradients are taken with respect to the input only, so parameter gradients are untouched.
"""

from __future__ import annotations

from typing import Callable

import torch

LINF, L2 = "linf", "l2"  # the norms, named as eval's `attacks[].norm` setting names them


def project_linf(adv: torch.Tensor, clean: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Into the L-inf ball of radius epsilon around `clean`, then into [0, 1]."""
    return torch.minimum(torch.maximum(adv, clean - epsilon), clean + epsilon).clamp(0, 1)


def project_l2(adv: torch.Tensor, clean: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Into the L2 ball of radius epsilon around `clean` (per sample), then into [0, 1]."""
    delta = adv - clean
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (clean.dim() - 1))
    return (clean + delta * torch.clamp(epsilon / norms, max=1.0)).clamp(0, 1)


def normalized_l2(grad: torch.Tensor) -> torch.Tensor:
    """Each sample's gradient scaled to unit L2 norm (the L2 steepest-ascent direction)."""
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))


def uniform_linf_start(clean: torch.Tensor, epsilon: float, unit_uniform: torch.Tensor) -> torch.Tensor:
    """A uniform point of the L-inf ball around `clean` (in [0, 1]), from U[0, 1) draws of its shape."""
    return (clean + epsilon * (unit_uniform * 2 - 1)).clamp(0, 1)


def ascend(adv: torch.Tensor, grad: torch.Tensor, clean: torch.Tensor, norm: str, epsilon: float,
           step_size: float) -> torch.Tensor:
    """One steepest-ascent step for the norm (the gradient's sign for L-inf, its unit L2 direction
    for L2), projected into the epsilon-ball around `clean` and [0, 1]."""
    if norm == LINF:
        return project_linf(adv + step_size * grad.sign(), clean, epsilon)
    if norm == L2:
        return project_l2(adv + step_size * normalized_l2(grad), clean, epsilon)
    raise ValueError(f"norm must be {LINF!r} or {L2!r}, got {norm!r}")


def pgd(grad_of: Callable[[torch.Tensor], torch.Tensor], clean: torch.Tensor, start: torch.Tensor, norm: str,
        epsilon: float, step_size: float, steps: int) -> torch.Tensor:
    """`steps` projected ascent steps from `start` (a point of the ball, or `clean` itself), each
    along `grad_of(adv)`; returns the last iterate, detached."""
    adv = start.detach()
    for _ in range(steps):
        adv = ascend(adv, grad_of(adv), clean, norm, epsilon, step_size)
    return adv.detach()


def input_gradient(loss_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`grad_of` for a scalar loss: d loss_of(x) / dx, at a detached copy of x."""
    def grad_of(adv: torch.Tensor) -> torch.Tensor:
        adv = adv.detach().requires_grad_(True)
        grad, = torch.autograd.grad(loss_of(adv), adv)
        return grad

    return grad_of

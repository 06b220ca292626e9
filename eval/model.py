"""The deployed model as the evaluation sees it: one call per noise draw, the noise of each
sample from that sample's generator.

- plain classifiers are deterministic: one draw, no noise;
- randomized models (De³, DMAE's smoothing base) take one standard normal draw per sample,
  which the deployed model itself scales and applies (pipeline/models/deployed.py);
  certification calls the classifier inside directly (eval/certify.py).

Memory: the weights are frozen (an attack needs gradients with respect to the input only), and
EOT gradients are accumulated one noise draw at a time, so an attack on a ViT-L holds one
draw's activations however many draws it averages over (16 draws of 50 images in one graph
would take ~280 GB). For the gradient of log(mean of the draws' probabilities), which does not
split into per-draw terms, the draws are first run without a graph to get the mean, then once
more each with its graph, weighted by the loss's derivative at that mean: exact, for one more
forward per draw.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustmim.pipeline.models.deployed import DeployedModel, DeploymentSpec
from robustmim.pipeline.randomness import per_sample_normal


class EvalModel:
    def __init__(self, module: DeployedModel, spec: DeploymentSpec):
        self.module, self.spec = module.eval().requires_grad_(False), spec
        self.randomized = module.randomized
        self.num_classes = spec.classifier.num_classes

    @property
    def base_classifier(self) -> nn.Module:
        """The deterministic classifier inside (what randomized smoothing certifies)."""
        return self.module.classifier

    def noise(self, images01: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor | None:
        """One draw of each sample's noise from its generator (None for deterministic models)."""
        if not self.randomized:
            return None
        return per_sample_normal(generators, tuple(images01.shape[1:]), images01.device).to(images01.dtype)

    def forward(self, images01: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Logits for the given noise draw (fp32, also when the matmuls run under bf16 autocast)."""
        return self.module(images01, noise).float()

    def logits(self, images01: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One forward with one noise draw per sample (none for deterministic models)."""
        return self.forward(images01, self.noise(images01, generators))

    def draws(self, requested: int) -> int:
        return requested if self.randomized else 1

    def mean_log_probs(self, images01: torch.Tensor, generators: list[torch.Generator], draws: int) -> torch.Tensor:
        """log of the probabilities averaged over `draws` noise draws (EOT's expectation)."""
        total = None
        for _ in range(self.draws(draws)):
            probs = F.softmax(self.logits(images01, generators), dim=-1)
            total = probs if total is None else total + probs
        return torch.log(total / self.draws(draws) + 1e-12)

    def eot_loss_and_grad(self, images01: torch.Tensor, generators: list[torch.Generator], draws: int,
                          loss_of: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] loss_of(mean log-probabilities over the draws), its gradient w.r.t. the images),
        holding one draw's graph at a time (module docstring). The draws are those
        `mean_log_probs` would take from the same generators."""
        images = images01.detach()
        noises = [self.noise(images, generators) for _ in range(self.draws(draws))]
        if len(noises) == 1:
            x = images.requires_grad_(True)
            loss = loss_of(torch.log(F.softmax(self.forward(x, noises[0]), dim=-1) + 1e-12))
            grad, = torch.autograd.grad(loss.sum(), x)
            return loss.detach(), grad
        with torch.no_grad():
            mean = sum(F.softmax(self.forward(images, noise), dim=-1) for noise in noises) / len(noises)
        mean.requires_grad_(True)
        loss = loss_of(torch.log(mean + 1e-12))
        weight, = torch.autograd.grad(loss.sum(), mean)  # d loss / d mean probability
        grad = torch.zeros_like(images)
        for noise in noises:
            x = images.clone().requires_grad_(True)
            probs = F.softmax(self.forward(x, noise), dim=-1)
            draw_grad, = torch.autograd.grad((probs * weight).sum() / len(noises), x)
            grad += draw_grad
        return loss.detach(), grad

    def mean_loss_and_grad(self, images01: torch.Tensor, labels: torch.Tensor, generators: list[torch.Generator],
                           draws: int, loss_of: Callable[[torch.Tensor], torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """([B] mean over the draws of loss_of(logits), its gradient w.r.t. the images, [B] whether
        the majority of the draws misclassified, ties to the lower class as `vote`): the loss is a
        plain mean, so each draw's graph is freed at once. A majority, not any one draw: a
        randomized model that one draw in twenty gets wrong still classifies the image correctly."""
        images = images01.detach()
        count = self.draws(draws)
        total, grad = torch.zeros(images.shape[0], device=images.device), torch.zeros_like(images)
        votes = torch.zeros(images.shape[0], self.num_classes, device=images.device)
        for _ in range(count):
            x = images.clone().requires_grad_(True)
            logits = self.logits(x, generators)
            loss = loss_of(logits)
            draw_grad, = torch.autograd.grad(loss.sum() / count, x)
            grad += draw_grad
            total += loss.detach()
            votes += F.one_hot(logits.detach().argmax(-1), self.num_classes).float()
        return total / count, grad, votes.argmax(-1) != labels

    @torch.no_grad()
    def vote(self, images01: torch.Tensor, generators: list[torch.Generator], draws: int) -> torch.Tensor:
        """[B] predictions: the majority over `draws` draws (ties to the lower class)."""
        counts = torch.zeros(images01.shape[0], self.num_classes, device=images01.device)
        for _ in range(self.draws(draws)):
            counts += F.one_hot(self.logits(images01, generators).argmax(-1), self.num_classes).float()
        return counts.argmax(-1)

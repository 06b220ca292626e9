"""The deployed model as the evaluation sees it: one call per noise draw, the noise of each
sample from that sample's generator.

- plain classifiers are deterministic: one draw, no noise;
- De³ draws its Gaussian noise (then denoises and classifies), differentiably;
- DMAE's base classifier is evaluated under its smoothing noise (the smoothed classifier's
  empirical behaviour); certification uses the base classifier directly (eval/certify.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.deployed import DefenseKind, DeploymentSpec
from eval.sampling import per_sample_normal


class EvalModel:
    def __init__(self, module: nn.Module, spec: DeploymentSpec):
        self.module, self.spec = module, spec
        self.randomized = spec.defense in (DefenseKind.denoise, DefenseKind.smoothing)
        self.num_classes = spec.classifier.num_classes

    @property
    def base_classifier(self) -> nn.Module:
        """The deterministic classifier inside (what randomized smoothing certifies)."""
        return getattr(self.module, "classifier", self.module)

    def logits(self, images01: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One forward with one noise draw per sample (none for deterministic models)."""
        if not self.randomized:
            return self.module(images01)
        noise = per_sample_normal(generators, tuple(images01.shape[1:]), images01.device).to(images01.dtype)
        if self.spec.defense is DefenseKind.denoise:
            return self.module(images01, noise=noise)
        return self.module(images01 + self.spec.sigma * noise)

    def draws(self, requested: int) -> int:
        return requested if self.randomized else 1

    def mean_log_probs(self, images01: torch.Tensor, generators: list[torch.Generator], draws: int) -> torch.Tensor:
        """log of the probabilities averaged over `draws` noise draws (EOT's expectation)."""
        total = None
        for _ in range(self.draws(draws)):
            probs = F.softmax(self.logits(images01, generators).float(), dim=-1)
            total = probs if total is None else total + probs
        return torch.log(total / self.draws(draws) + 1e-12)

    @torch.no_grad()
    def vote(self, images01: torch.Tensor, generators: list[torch.Generator], draws: int) -> torch.Tensor:
        """[B] predictions: the majority over `draws` draws (ties to the lower class)."""
        counts = torch.zeros(images01.shape[0], self.num_classes, device=images01.device)
        for _ in range(self.draws(draws)):
            counts += F.one_hot(self.logits(images01, generators).argmax(-1), self.num_classes).float()
        return counts.argmax(-1)

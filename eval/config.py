"""`robustmim eval` configuration: what to evaluate, on which samples, with which attacks and
certification settings (the published protocols; ImageNet-style defaults)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from robustmim.pipeline.engine.config import Precision


class Norm(enum.Enum):
    linf = "linf"
    l2 = "l2"


class AttackLoss(enum.Enum):
    ce = "ce"  # cross-entropy of the (EOT-averaged) prediction
    margin = "margin"  # log p_label - max other log p (CW-style margin on log-probabilities)


@dataclass
class PGDConfig:
    """PGD in [0, 1] pixel space: random start, `steps` steps, best of `restarts` runs per sample."""

    norm: Norm = Norm.linf  # linf or l2
    epsilons: list[float] = field(default_factory=lambda: [4 / 255])  # budgets in [0, 1] pixels; one result per epsilon
    steps: int = 10  # PGD iterations
    step_size: float = 0.0  # absolute; 0: 2.5 * epsilon / steps (Madry's heuristic)
    restarts: int = 1  # runs from fresh random starts; a sample is robust only if none fools it
    loss: AttackLoss = AttackLoss.ce  # ce or margin
    random_start: bool = True  # start uniformly in the ball (false: at the clean image)
    # Randomized models (De³'s noise, DMAE's smoothing noise): each gradient averages the
    # predicted probabilities over `eot` noise draws (EOT); each final adversarial image is
    # scored by a majority vote over `score_draws` fresh draws. Deterministic models use 1 and 1.
    eot: int = 8
    score_draws: int = 8  # randomized models: draws of the majority vote scoring each adversarial image

    def __post_init__(self) -> None:
        if not self.epsilons or any(e <= 0 for e in self.epsilons):
            raise ValueError("attack epsilons must be a non-empty list of positive values")
        if self.steps < 1 or self.restarts < 1 or self.eot < 1 or self.score_draws < 1 or self.step_size < 0:
            raise ValueError("attack steps, restarts, eot and score_draws must be >= 1, step_size >= 0")

    def step_for(self, epsilon: float) -> float:
        return self.step_size or 2.5 * epsilon / self.steps


class AutoAttackVersion(enum.Enum):
    """Which suite runs; each attack runs only on the samples every earlier one left robust.

    standard: AutoAttack's standard suite, APGD-CE, APGD-T, FAB-T, Square (5,000 queries), through
      torchattacks' implementations; deterministic models only (eval/autoattack.py).
    rand: AutoAttack's version for randomized models, APGD-CE then APGD-DLR, each with EOT (20).
    apgd: APGD-CE then APGD-T, our APGD with EOT (AutoAttack's first two attacks; cheaper).
    rand and apgd are ours (eval/apgd.py): their noise and random starts are drawn per sample, so a
    sample's result does not depend on its batch or rank, which torchattacks' batch-wide draws
    cannot give.
    """

    standard = "standard"
    rand = "rand"
    apgd = "apgd"


@dataclass
class AutoAttackConfig:
    enabled: bool = False  # run the suite after the PGD attacks
    version: AutoAttackVersion = AutoAttackVersion.standard  # standard, rand or apgd (below)
    norm: Norm = Norm.linf  # linf or l2
    epsilon: float = 4 / 255  # the budget in [0, 1] pixels
    steps: int = 100  # per APGD and FAB run (AutoAttack: 100)
    targets: int = 9  # target classes of APGD-T and FAB-T (AutoAttack: 9)
    square_queries: int = 5000  # standard: Square's query budget (AutoAttack: 5,000)
    eot: int = 20  # randomized models: loss averaged over this many draws (AutoAttack 'rand': 20)
    score_draws: int = 8  # randomized models: draws of the majority vote scoring each image

    def __post_init__(self) -> None:
        if self.epsilon <= 0 or self.steps < 1 or self.targets < 0 or self.eot < 1 or self.score_draws < 1 \
                or self.square_queries < 1:
            raise ValueError("autoattack needs epsilon > 0, steps, eot, score_draws, square_queries >= 1 and "
                             "targets >= 0")


@dataclass
class CertifyConfig:
    """Cohen et al.'s CERTIFY on the [0, 1] input, noise unclipped."""

    enabled: bool = False  # randomized smoothing's CERTIFY (Cohen et al.) of each sample
    sigma: Optional[float] = None  # None: the exported model's smoothing sigma
    n0: int = 100  # selection draws
    n: int = 10_000  # estimation draws (Cohen's default 100,000; Carlini / DMAE 10,000)
    alpha: float = 0.001  # CERTIFY's failure probability
    batch: int = 1000  # noisy copies per forward
    # certified accuracy is reported at these L2 radii
    radii: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0])

    def __post_init__(self) -> None:
        if self.n0 < 1 or self.n < 1 or self.batch < 1 or not 0 < self.alpha < 0.5:
            raise ValueError("certify needs n0, n, batch >= 1 and 0 < alpha < 0.5")
        if self.sigma is not None and self.sigma <= 0:
            raise ValueError(f"certify.sigma must be positive, got {self.sigma}")


@dataclass
class PredictConfig:
    """Cohen et al.'s PREDICT: abstain unless a binomial test separates the top two classes."""

    enabled: bool = False  # Cohen et al.'s PREDICT of each sample
    n: int = 1000  # noise draws
    alpha: float = 0.001  # the binomial test's level
    batch: int = 1000  # noisy copies per forward

    def __post_init__(self) -> None:
        if self.n < 1 or self.batch < 1 or not 0 < self.alpha < 0.5:
            raise ValueError("predict needs n, batch >= 1 and 0 < alpha < 0.5")


@dataclass
class EvalConfig:
    model: str = MISSING  # a classifier export's .json (or its .safetensors)
    shards: str = MISSING  # a shards directory
    out_dir: str = MISSING  # records/, records.jsonl, summary.json, plan.json; a re-run resumes it
    split: str = "val"  # the split evaluated (Fashion-MNIST's test images are split val)
    seed: int = 0  # every draw of sample i comes from a generator seeded by (seed, i, purpose)
    every_nth: int = 1  # the standard subsets: 50 or 100 for ImageNet val, 20 for a small test set
    max_samples: int = 0  # stop after this many selected samples (0: all)
    batch_size: int = 64  # images per forward for clean accuracy and attacks
    eval_crop_fraction: float = 0.875  # resize shorter side to size / fraction, center crop
    num_threads: int = 4  # DALI CPU threads
    clean: bool = True  # record clean accuracy
    clean_draws: int = 8  # randomized models: clean prediction = majority over this many draws
    # PGD attacks: a list of {norm, epsilons, steps, ...}; [] for none
    attacks: list[PGDConfig] = field(default_factory=lambda: [PGDConfig()])
    autoattack: AutoAttackConfig = field(default_factory=AutoAttackConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    # Later restarts, larger epsilons and APGD-T's target runs attack only the samples still
    # robust (a sample fooled at a smaller epsilon keeps that image). The records are identical
    # either way (every draw is per sample); false attacks every sample every time.
    compact_attacks: bool = True
    # bf16 autocast for every forward (attacks, certification); logits, losses and perturbations
    # stay fp32. auto: bf16 on GPU, fp32 on CPU (no bf16 hardware there).
    precision: Precision = Precision.auto
    # torch.compile each transformer block of the deployed model (classifier, De³'s denoiser):
    # null (auto) on GPU, where it measured faster, off on CPU.
    compile: Optional[bool] = None
    # A restart must use the settings its records were made with; with fresh=true, changed
    # settings move the old records to out_dir/superseded/<time>/ and the evaluation starts over.
    fresh: bool = False

    def __post_init__(self) -> None:
        if self.precision is Precision.bf16_weights:
            raise ValueError("precision=bf16_weights is a training mode (DeepSpeed's bf16 weights); an evaluation "
                             "takes auto, fp32 or bf16 (autocast)")
        if self.every_nth < 1 or self.max_samples < 0 or self.batch_size < 1 or self.clean_draws < 1:
            raise ValueError("every_nth, batch_size and clean_draws must be >= 1, max_samples >= 0")

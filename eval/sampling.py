"""Which samples are evaluated, and the per-sample random draws.

Every draw for sample i comes from its own generator seeded by (seed, i, purpose...), so a
sample's outcome does not depend on the batch it landed in, the number of ranks, or whether
the run was restarted.
"""

from __future__ import annotations

import numpy as np
import torch

# purposes of the draws of one sample
CLEAN = 1
ATTACK = 2  # + (attack number, epsilon number, restart)
CERTIFY_SELECT = 3
CERTIFY_ESTIMATE = 4
PREDICT = 5


def selected_indices(total: int, every_nth: int, max_samples: int) -> list[int]:
    """Samples 0, n, 2n, ... of the split (Cohen's `skip`), at most max_samples (0: all)."""
    chosen = list(range(0, total, every_nth))
    return chosen[:max_samples] if max_samples else chosen


def sample_generator(seed: int, index: int, *purpose: int, device: torch.device | str = "cpu") -> torch.Generator:
    state = np.random.SeedSequence([seed, index, *purpose]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state) & (2**63 - 1))
    return generator


def per_sample_normal(generators: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    """[B, *shape]: one standard normal draw per sample, each from its own generator."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])


def per_sample_uniform(generators: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    return torch.stack([torch.rand(shape, generator=g, device=device) for g in generators])

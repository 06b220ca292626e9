"""Which samples are evaluated, and the purposes that key each sample's random draws.

Every draw for sample i comes from its own generator seeded by (seed, i, purpose...)
(`robustmim.pipeline.randomness.sample_generator`), so a sample's outcome does not depend on the batch it
landed in, the number of ranks, or whether the run was restarted.
"""

from __future__ import annotations

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

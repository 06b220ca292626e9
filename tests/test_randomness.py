"""The seeded draws every stage shares (pipeline/randomness.py): keyed streams, and the Gamma and
Beta samplers rebuilt on generator draws, checked against scipy's distributions."""

import pytest
import torch
from scipy import stats

from robustmim.pipeline.randomness import (per_sample_normal, sample_beta, sample_gamma, sample_generator,
                                           seeded_generator, step_generator)


def test_a_key_fixes_the_stream_and_nearby_keys_give_unrelated_ones():
    def draws(generator):
        return torch.rand(1000, generator=generator)

    assert torch.equal(draws(step_generator(3, 10, 1, "cpu")), draws(step_generator(3, 10, 1, "cpu")))
    assert torch.equal(draws(step_generator(3, 10, 1, "cpu")), draws(sample_generator(3, 10, 1)))
    reference = draws(step_generator(3, 10, 1, "cpu"))
    for key in ((3, 1, 10), (3, 11, 1), (4, 10, 1), (3, 10, 1, 1)):
        other = draws(seeded_generator(*key))
        assert abs(torch.corrcoef(torch.stack([reference, other]))[0, 1].item()) < 0.1
    # what the module's docstring warns of: trailing zeros do not change a key's stream
    assert torch.equal(draws(sample_generator(3, 10)), draws(sample_generator(3, 10, 0, 0)))


def test_per_sample_draws_do_not_depend_on_the_batch():
    together = per_sample_normal([seeded_generator(0, i) for i in range(4)], (3, 2), "cpu")
    alone = per_sample_normal([seeded_generator(0, 2)], (3, 2), "cpu")
    assert torch.equal(together[2], alone[0])


@pytest.mark.parametrize("shape_k,scale", [(25.0, 3.0), (2.0, 1.0), (0.5, 4.0)])
def test_gamma_draws_follow_scipy_s_gamma(shape_k, scale):
    draws = sample_gamma(shape_k, scale, 20_000, step_generator(0, 0, 0, "cpu"), "cpu").double().numpy()
    assert stats.kstest(draws, stats.gamma(shape_k, scale=scale).cdf).pvalue > 0.001
    assert (draws > 0).all()


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_beta_draws_follow_scipy_s_beta(alpha):
    generator = step_generator(0, 0, 0, "cpu")
    draws = torch.stack([sample_beta(alpha, generator, "cpu") for _ in range(4000)]).double().numpy()
    assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 0.001
    assert ((draws >= 0) & (draws <= 1)).all()

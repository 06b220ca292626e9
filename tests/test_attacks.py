"""The one projected-gradient loop (pipeline/attacks.py) that MIMIR's pretraining, PGD
adversarial fine-tuning, DAT and the eval stage's PGD share, against torchattacks' PGD and PGDL2."""

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from robustmim.pipeline.attacks import L2, LINF, ascend, input_gradient, pgd, uniform_linf_start
from robustmim.pipeline.models.classifier import ViTClassifier

from helpers import tiny_classifier_config


@pytest.fixture(scope="module")
def classifier_and_batch():
    torch.manual_seed(0)
    model = ViTClassifier(tiny_classifier_config(drop_path=0.0)).eval()
    images = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    return model, images, torch.arange(16) % 10


@pytest.mark.parametrize("norm, epsilon, step", [(LINF, 0.1, 0.025), (L2, 1.0, 0.25)])
def test_pgd_from_the_clean_image_equals_torchattacks(classifier_and_batch, norm, epsilon, step):
    model, images, labels = classifier_and_batch
    ours = pgd(input_gradient(lambda x: F.cross_entropy(model(x), labels)), images, images, norm, epsilon, step, 10)
    reference_class = torchattacks.PGD if norm == LINF else torchattacks.PGDL2
    reference = reference_class(model, eps=epsilon, alpha=step, steps=10, random_start=False)(images, labels)
    assert (ours - reference).abs().max() < 1e-5  # projections round in another order
    size = (ours - images).flatten(1)
    size = size.abs().max(1).values if norm == LINF else size.norm(dim=1)
    assert (size <= epsilon + 1e-5).all() and size.max() > 0.9 * epsilon  # the budget is used, not exceeded


def test_a_linf_start_is_uniform_in_the_ball_and_the_image_range():
    clean = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    start = uniform_linf_start(clean, 0.1, torch.rand(clean.shape, generator=torch.Generator().manual_seed(3)))
    delta = start - clean
    assert start.min() >= 0 and start.max() <= 1 and delta.abs().max() <= 0.1 + 1e-7
    inside = (clean > 0.1) & (clean < 0.9)  # away from the clamp: delta ~ U(-0.1, 0.1), mean 0, variance 0.01/3
    assert abs(delta[inside].mean().item()) < 0.002 and delta[inside].var().item() == pytest.approx(0.01 / 3, rel=0.02)


def test_an_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm must be 'linf' or 'l2'"):
        ascend(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1), "l1", 0.1, 0.1)

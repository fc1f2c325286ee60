"""Losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fastad.siamese import SiameseOutput, bce_loss, contrastive_loss, siamese_loss


def _emb(*vectors):
    return torch.tensor(vectors, dtype=torch.float64).view(len(vectors), -1, 1, 1)


def test_contrastive_by_hand():
    f1 = _emb([3.0, 4.0], [3.0, 4.0], [3.0, 4.0], [0.6, 0.8])
    f2 = _emb([0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    # d = 5, 5, 5, 1
    similar = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # similar: ½·25 = 12.5; dissimilar with margin 6: ½·(6-5)² = 0.5 twice; d = 1: ½·25 = 12.5
    assert float(contrastive_loss(f1, f2, similar, margin=6.0)) == pytest.approx((12.5 + 0.5 + 0.5 + 12.5) / 4)
    # Margin 4: the dissimilar pairs at d = 5 are already beyond it; d = 1 gives ½·9.
    assert float(contrastive_loss(f1, f2, similar, margin=4.0)) == pytest.approx((12.5 + 0 + 0 + 4.5) / 4)


def test_contrastive_gradient_is_finite_at_zero_distance():
    f1 = _emb([1.0, 2.0]).requires_grad_()
    f2 = _emb([1.0, 2.0])
    for label in (1.0, 0.0):
        f1.grad = None
        contrastive_loss(f1, f2, torch.tensor([label]), margin=1.0).backward()
        assert torch.isfinite(f1.grad).all()
    # Dissimilar at d = 0: loss ½ r².
    assert float(contrastive_loss(f1.detach(), f2, torch.tensor([0.0]), margin=2.0)) == pytest.approx(2.0)


def test_contrastive_averages_over_positions():
    f1 = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    f2 = torch.zeros_like(f1)
    f2[0, 0, 0, 1] = 2.0  # d = 0 and 2 at the two positions
    assert float(contrastive_loss(f1, f2, torch.tensor([1.0]))) == pytest.approx((0 + 2.0) / 2)


def test_bce_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64).view(3, 1, 1)
    similar = torch.tensor([1.0, 1.0, 0.0])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = -(math.log(sig(2.0)) + math.log(sig(-1.0)) + math.log(1 - sig(0.5))) / 3
    assert float(bce_loss(logits, similar)) == pytest.approx(expected, rel=1e-12)


def test_both_is_the_sum():
    f1, f2 = _emb([1.0, 0.0], [0.0, 0.0]), _emb([0.0, 0.0], [0.0, 0.5])
    logits = torch.tensor([0.3, -0.2], dtype=torch.float64).view(2, 1, 1)
    similar = torch.tensor([0.0, 1.0])
    out = SiameseOutput(f1, f2, logits)
    total = siamese_loss(out, similar, "both", margin=2.0)
    assert float(total) == pytest.approx(float(contrastive_loss(f1, f2, similar, 2.0) + bce_loss(logits, similar)))
    assert float(siamese_loss(out, similar, "bce")) == pytest.approx(float(bce_loss(logits, similar)))


def test_bad_loss_choices():
    out = SiameseOutput(_emb([1.0]), _emb([0.0]), None)
    with pytest.raises(ValueError, match="needs a discriminator"):
        siamese_loss(out, torch.tensor([1.0]), "bce")
    with pytest.raises(ValueError, match="loss must be one of"):
        siamese_loss(out, torch.tensor([1.0]), "hinge")


def test_defaults_train_the_discriminator_with_bce_alone():
    """The paper trains its defect detector's discriminator with binary cross-entropy (the score
    is 1 - P(similar)); the contrastive term is the MNIST "no discriminator" variant's loss, and
    their sum is a named option. A drift of any default back to the sum fails here."""
    import inspect

    from fastad.siamese import SiameseDetector
    from fastad.siamese.training import train_network

    assert SiameseDetector().loss == "bce"
    assert inspect.signature(train_network).parameters["loss"].default == "bce"
    f1, f2 = _emb([1.0, 0.0], [0.0, 0.0]), _emb([0.0, 0.0], [0.0, 0.5])
    logits = torch.tensor([0.3, -0.2], dtype=torch.float64).view(2, 1, 1)
    similar = torch.tensor([0.0, 1.0])
    assert float(siamese_loss(SiameseOutput(f1, f2, logits), similar)) == pytest.approx(
        float(bce_loss(logits, similar)), rel=1e-12
    )

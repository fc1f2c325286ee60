"""Gaussian AD against scikit-learn's Ledoit-Wolf and a float64 Mahalanobis distance on the same
pooled features, plus its options, model files and the absence of maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastad.methods.gaussian_ad import GaussianAD

from ..conftest import require_lite0

require_lite0()

SIZE = 64


def lite0(**kw) -> GaussianAD:
    kw.setdefault("holdout", 0)
    return GaussianAD(backbone="efficientnet_lite0", resize=None, crop=None, **kw)


def images(n: int, gen: torch.Generator) -> torch.Tensor:
    base = torch.rand(n, 1, 1, 1, generator=gen) * 0.5
    return (base + 0.4 * torch.rand(n, 3, SIZE, SIZE, generator=gen)).clamp(0, 1)


def pooled(model: GaussianAD, batch: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        return {k: v.double().mean(dim=(2, 3)).numpy() for k, v in model._features(batch).items()}


def test_scores_equal_sklearn_ledoit_wolf_and_float64_distances(rng):
    covariance = pytest.importorskip("sklearn.covariance")
    train, test = images(24, rng), images(4, rng)
    model = lite0(batch_size=10).fit(train)
    assert list(model.mean_) == ["stem", *[f"block{i}" for i in range(7)], "head"]  # the nine levels
    prediction = model.predict(test)
    assert prediction.maps is None
    expected = np.zeros(test.shape[0])
    train_f, test_f = pooled(model, train), pooled(model, test)
    for level, x in train_f.items():
        shrunk, shrinkage = covariance.ledoit_wolf(x)
        assert model.shrinkage_[level] == pytest.approx(shrinkage, rel=1e-6, abs=1e-9)
        delta = test_f[level] - x.mean(axis=0)
        expected += np.sqrt(np.einsum("bi,ij,bj->b", delta, np.linalg.inv(shrunk), delta))
    np.testing.assert_allclose(prediction.scores.double().numpy(), expected, rtol=2e-3)


def test_empirical_covariance_option(rng):
    train, test = images(12, rng), images(2, rng)
    model = lite0(layers=["block1", "block2"], covariance="empirical", eps=0.5).fit(train)
    train_f, test_f = pooled(model, train), pooled(model, test)
    expected = np.zeros(2)
    for level, x in train_f.items():
        cov = np.cov(x.T, ddof=1) + 0.5 * np.eye(x.shape[1])
        delta = test_f[level] - x.mean(axis=0)
        expected += np.sqrt(np.einsum("bi,ij,bj->b", delta, np.linalg.inv(cov), delta))
    np.testing.assert_allclose(model.predict(test).scores.double().numpy(), expected, rtol=2e-3)
    with pytest.raises(ValueError, match="level 'block1'.*singular"):
        lite0(layers=["block1", "block2"], covariance="empirical", eps=0.0).fit(train)  # 12 samples in 24 dims


def test_paper_defaults_and_bad_parameters(rng):
    model = GaussianAD()
    assert (model.backbone, model.resize, model.crop, model.covariance) == ("efficientnet_b4", 380, 380, "ledoit_wolf")
    assert len(model.feature_layers()) == 9
    with pytest.raises(ValueError, match="covariance must be one of"):
        lite0(covariance="oas").fit(images(3, rng))
    for bad in (-0.1, float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            lite0(eps=bad).fit(images(3, rng))

"""MLF-SC against a float64 re-implementation of its scoring (explicit patch loops, the reference
OMP), plus the VGG pre-ReLU wiring, model files and bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastad
from fastad.methods import AnomalyModel
from fastad.methods.mlfsc import MLFSC

from ..conftest import require_lite0

require_lite0()

SIZE = 64
LAYERS = ["block1", "block2"]  # 24 + 40 channels: small enough for a float64 loop


def lite0(**kw) -> MLFSC:
    kw.setdefault("holdout", 0)
    kw.setdefault("layers", LAYERS)
    return MLFSC(backbone="efficientnet_lite0", resize=None, crop=None, **kw)


def images(n: int, gen: torch.Generator) -> torch.Tensor:
    base = torch.rand(n, 1, 1, 1, generator=gen) * 0.5
    return (base + 0.4 * torch.rand(n, 3, SIZE, SIZE, generator=gen)).clamp(0, 1)


def reference_scores(model: MLFSC, batch: torch.Tensor):
    """(image scores (B,), maps (B, feature_size, feature_size)) by the paper's definition, in
    float64, with explicit patch loops and fastad.reference.omp."""
    with torch.inference_mode():
        features = model._features(batch)
    size, crop, p, s = model.feature_size, model.crop_size, model.patch_size, model.patch_stride
    top = (size - crop) // 2
    levels = [F.interpolate(f.double(), size=(size, size), mode="bilinear", align_corners=False)[..., top:top + crop, top:top + crop]
              for f in features.values()]
    maps = torch.cat(levels, dim=1)  # (B, C, crop, crop)
    b, c = maps.shape[:2]
    starts = range(0, crop - p + 1, s)
    patches = torch.stack([maps[:, :, i:i + p, j:j + p].reshape(b, c, p * p) for i in starts for j in starts], dim=2)  # (B, C, P, d)
    dictionary = model.dictionary_.double()
    x = patches.permute(1, 0, 2, 3).reshape(c, -1, p * p)
    idx, coef = fastad.reference.omp(x, dictionary, model.n_nonzero)
    recon = torch.zeros_like(x)
    for t in range(idx.shape[-1]):
        used = idx[..., t] >= 0
        atoms = torch.gather(dictionary, 1, idx[..., t].clamp_min(0).unsqueeze(-1).expand(-1, -1, p * p))
        recon += torch.where(used.unsqueeze(-1), coef[..., t:t + 1].double() * atoms, 0.0)
    errors = ((x - recon) ** 2).sum(-1).reshape(c, b, -1)  # (C, B, P)
    scores = errors.topk(model.top_k, dim=-1).values.mean(-1).sum(0)
    total = errors.sum(0)  # (B, P)
    acc = torch.zeros(b, crop, crop, dtype=torch.float64)
    count = torch.zeros(crop, crop, dtype=torch.float64)
    for k, (i, j) in enumerate((i, j) for i in starts for j in starts):
        acc[:, i:i + p, j:j + p] += total[:, k, None, None]
        count[i:i + p, j:j + p] += 1
    crop_map = acc / count
    full = F.pad(crop_map.unsqueeze(1), (top, size - crop - top) * 2, mode="replicate")[:, 0]
    return scores, full


def test_scores_and_maps_equal_a_float64_reference(rng):
    train, test = images(12, rng), images(3, rng)
    model = lite0(batch_size=5).fit(train)
    assert model.dictionary_.shape == (64, 5, 64) and model.dictionary_.dtype == torch.float32
    torch.testing.assert_close(model.dictionary_.norm(dim=-1), torch.ones(64, 5))
    with torch.inference_mode():
        patch_map, scores = model._score_batch(test)
    ref_scores, ref_map = reference_scores(model, test)
    assert patch_map.shape == (3, 32, 32)
    # OMP in float32 against float64: a near-tie between atoms may pick another support for a
    # patch now and then, so the sums are compared at 1e-3.
    np.testing.assert_allclose(scores.double().numpy(), ref_scores.numpy(), rtol=1e-3)
    np.testing.assert_allclose(patch_map.double().numpy(), ref_map.numpy(), rtol=1e-3, atol=1e-6 * float(ref_map.abs().max()))
    prediction = model.predict(test)
    assert prediction.maps.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(prediction.scores, scores)


def test_dictionaries_come_from_the_streamed_patches(rng):
    from fastad.dictionary import DictionaryLearner

    train = images(6, rng)
    model = lite0(batch_size=6, n_atoms=4, n_nonzero=2, seed=3).fit(train)
    learner = DictionaryLearner(64, 4, 64, 2, batch_size=model.dictionary_batch, seed=3)
    with torch.inference_mode():
        learner.partial_fit(model.patches(train))
    torch.testing.assert_close(model.dictionary_, learner.dictionary_.float())


def test_vgg_levels_are_taken_before_the_relu():
    model = MLFSC(weights=None, resize=None, crop=None, holdout=0)
    assert model.feature_layers() == ["conv2_2", "conv3_3", "conv4_3"]  # the paper's levels
    assert model._backbone_options() == {"pre_relu": True}
    with torch.inference_mode():
        features = model._features(torch.rand(1, 3, 32, 32))
    assert all(float(f.min()) < 0 for f in features.values())  # a ReLU output would be >= 0
    assert model.set_params(pre_relu=False)._backbone_options() == {}
    assert lite0()._backbone_options() == {}


def test_model_file_round_trip_gives_identical_predictions(rng, tmp_path):
    train, test = images(6, rng), images(2, rng)
    model = lite0().fit(train)
    loaded = AnomalyModel.load(model.save(tmp_path / "mlfsc.safetensors"))
    assert type(loaded) is MLFSC and loaded.get_params() == model.get_params()
    before, after = model.predict(test), loaded.predict(test)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)


@pytest.mark.parametrize("params,message", [
    ({"crop_size": 40}, "crop_size <= feature_size"),
    ({"patch_stride": 3}, "multiple of patch_stride"),
    ({"n_nonzero": 6}, "n_nonzero"),
    ({"n_atoms": 0}, "n_atoms"),
    ({"seed": -1}, "seed"),
])
def test_bad_parameters_are_named(rng, params, message):
    with pytest.raises(ValueError, match=message):
        lite0(**params).fit(images(2, rng))

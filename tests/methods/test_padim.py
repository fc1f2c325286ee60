"""PaDiM against a float64 implementation of the paper on the same features (numpy covariance,
explicit inverse), plus its options, model files, memory that does not grow with the training
set, and bad parameters."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastad.methods import AnomalyModel
from fastad.methods.padim import PaDiM

from ..conftest import require_lite0

require_lite0()

SIZE = 64  # Lite0's stride-4 grid is then 16 x 16


def lite0(**kw) -> PaDiM:
    kw.setdefault("holdout", 0)
    return PaDiM(backbone="efficientnet_lite0", resize=None, crop=None, **kw)


def images(n: int, gen: torch.Generator, size: int = SIZE) -> torch.Tensor:
    base = torch.rand(n, 1, 1, 1, generator=gen) * 0.5
    return (base + 0.4 * torch.rand(n, 3, size, size, generator=gen)).clamp(0, 1)


def reference_embeddings(model: PaDiM, batch: torch.Tensor) -> np.ndarray:
    """(B, h, w, D) float64 by the paper's definition: the layers concatenated at the first
    layer's grid, deeper ones repeated (nearest), then the kept channels."""
    with torch.inference_mode():
        features = model._features(batch)
    layers = model.feature_layers()
    grid = features[layers[0]].shape[-2:]
    full = torch.cat([F.interpolate(features[name].double(), size=grid, mode="nearest") for name in layers], dim=1)
    return full[:, model.channels_].permute(0, 2, 3, 1).numpy()


def reference_padim(model: PaDiM, train: torch.Tensor, test: torch.Tensor, eps: float) -> np.ndarray:
    """(B, h, w) Mahalanobis distances with np.cov (ddof 1) + eps I and np.linalg.inv."""
    tr, te = reference_embeddings(model, train), reference_embeddings(model, test)
    n, h, w, d = tr.shape
    tr, te = tr.reshape(n, h * w, d), te.reshape(te.shape[0], h * w, d)
    out = np.empty((te.shape[0], h * w))
    for p in range(h * w):
        mean = tr[:, p].mean(axis=0)
        precision = np.linalg.inv(np.cov(tr[:, p].T, ddof=1) + eps * np.eye(d))
        delta = te[:, p] - mean
        out[:, p] = np.sqrt(np.einsum("bi,ij,bj->b", delta, precision, delta))
    return out.reshape(-1, h, w)


@pytest.mark.parametrize("size", [SIZE, 76])  # 76: grids 19, 10, 5, not whole multiples
def test_maps_equal_a_float64_reference(rng, size):
    train, test = images(40, rng, size), images(3, rng, size)
    model = lite0(n_features=24, batch_size=16).fit(train)  # three batches, the last one short
    grid = (size + 3) // 4
    assert model.channels_.shape == (24,) and model.mean_.shape == (grid * grid, 24)
    assert model.precision_factor_.shape == (grid * grid, 24, 24) and model.precision_factor_.dtype == torch.float32
    with torch.inference_mode():
        patch_map, image_score = model._score_batch(test)
    assert image_score is None and patch_map.shape == (3, grid, grid)
    expected = reference_padim(model, train, test, eps=0.01)
    np.testing.assert_allclose(patch_map.double().numpy(), expected, rtol=2e-3, atol=1e-4)
    prediction = model.predict(test)
    assert prediction.maps.shape == (3, size, size)
    torch.testing.assert_close(prediction.scores, prediction.maps.amax(dim=(1, 2)))


def test_channel_subset_is_seeded_and_clipped(rng):
    train = images(6, rng)
    a = lite0(n_features=30, seed=3, covariance="ledoit_wolf").fit(train)
    b = lite0(n_features=30, seed=3, covariance="ledoit_wolf").fit(train)
    c = lite0(n_features=30, seed=4, covariance="ledoit_wolf").fit(train)
    assert torch.equal(a.channels_, b.channels_) and not torch.equal(a.channels_, c.channels_)
    assert bool((a.channels_.diff() > 0).all()) and int(a.channels_.max()) < 176
    everything = lite0(n_features=10_000, covariance="ledoit_wolf").fit(train)  # Lite0 has 24 + 40 + 112
    assert torch.equal(everything.channels_, torch.arange(176))
    assert lite0()._channel_subset(176).shape == (176,)  # no paper subset for Lite0: all channels
    assert PaDiM(backbone="wide_resnet50_2")._channel_subset(1792).shape == (550,)
    assert PaDiM(backbone="resnet18")._channel_subset(448).shape == (100,)


def test_ledoit_wolf_option_and_singular_covariance(rng):
    train, test = images(5, rng), images(2, rng)  # 5 samples in 40 dims: singular without help
    with pytest.raises(ValueError, match="singular or not positive definite"):
        lite0(n_features=40, eps=0.0).fit(train)
    shrunk = lite0(n_features=40, eps=0.0, covariance="ledoit_wolf").fit(train)
    assert torch.isfinite(shrunk.predict(test).maps).all()


def test_model_file_round_trip_gives_identical_predictions(rng, tmp_path):
    train, test = images(12, rng), images(2, rng)
    model = lite0(n_features=16).fit(train)
    loaded = AnomalyModel.load(model.save(tmp_path / "padim.safetensors"))
    assert type(loaded) is PaDiM and loaded.get_params() == model.get_params()
    assert torch.equal(loaded.channels_, model.channels_) and torch.equal(
        loaded.precision_factor_, model.precision_factor_
    )
    # The file stores the factors contiguous; fitted and loaded models both hold them column-major,
    # the layout the CPU kernel reads in place.
    assert model.precision_factor_.stride(1) == 1 and loaded.precision_factor_.stride(1) == 1
    before, after = model.predict(test), loaded.predict(test)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)


def test_images_of_another_size_are_refused(rng):
    model = lite0(n_features=8).fit(images(10, rng))
    with pytest.raises(ValueError, match="fitted on a 16x16 feature grid"):
        model.predict(images(1, rng, size=96))
    mixed = [images(1, rng)[0], images(1, rng, size=96)[0]]
    with pytest.raises(ValueError, match="one size"):
        lite0(n_features=8, batch_size=1).fit(mixed)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"n_features": 0}, "n_features"),
        ({"covariance": "shrunk"}, "covariance must be one of"),
        ({"eps": -1.0}, "eps must be a finite number >= 0"),
        ({"eps": float("inf")}, "eps must be a finite number >= 0"),
        ({"seed": -2}, "seed"),
    ],
)
def test_bad_parameters_are_named(rng, params, message):
    with pytest.raises(ValueError, match=message):
        lite0(**params).fit(images(3, rng))


_MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from fastad.methods.padim import PaDiM

    class Stream(torch.utils.data.Dataset):
        # Images made on demand: the data set itself holds nothing.
        def __init__(self, n): self.n = n
        def __len__(self): return self.n
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return torch.rand(3, 128, 128, generator=g)

    torch.set_num_threads(2)
    model = PaDiM(backbone="efficientnet_lite0", resize=None, crop=None, holdout=0, batch_size=16)
    model.fit(Stream(16))  # everything built and warmed up once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.fit(Stream(int(sys.argv[1])))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


def _peak_growth(n_images: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(n_images)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fit_memory_does_not_grow_with_the_number_of_images():
    # 32 x 32 positions x 176 channels: each image's embedding is 0.7 MB in float32, so keeping
    # 192 of them would add 138 MB; the float64 statistics (250 MB) are the same for any count.
    few, many = _peak_growth(32), _peak_growth(192)
    assert many - few < 40 * 2**20, (
        f"peak grew by {few / 2**20:.0f} MiB for 32 images and {many / 2**20:.0f} MiB for 192"
    )

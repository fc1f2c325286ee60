"""MLF-SC against a float64 re-implementation of its scoring (explicit patch loops, the reference
OMP), plus the VGG pre-ReLU wiring, model files and bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastad
from fastad.methods.mlfsc import MLFSC

from ..conftest import require_lite0

require_lite0()

SIZE = 96  # Lite0 block2 is at stride 8: a 12-cell grid, 8 after the cut-off
LAYERS = ["block1", "block2"]  # 24 + 40 channels: small enough for a float64 loop


def lite0(**kw) -> MLFSC:
    kw.setdefault("holdout", 0)
    kw.setdefault("layers", LAYERS)
    return MLFSC(backbone="efficientnet_lite0", resize=None, crop=None, **kw)


def images(n: int, gen: torch.Generator) -> torch.Tensor:
    base = torch.rand(n, 1, 1, 1, generator=gen) * 0.5
    return (base + 0.4 * torch.rand(n, 3, SIZE, SIZE, generator=gen)).clamp(0, 1)


def reference_scores(model: MLFSC, batch: torch.Tensor):
    """(image scores (B,), maps (B, feature_size, feature_size)) of the earlier fastad variant
    (levels="resized_maps", standardize=False, map_mode="patch_mean"), in float64, with explicit
    patch loops and fastad.reference.omp."""
    with torch.inference_mode():
        features = model._features(batch)
    size, p, s = model.feature_size, model.patch_size, model.patch_stride
    top = model.cutoff
    crop = size - 2 * top
    levels = [
        F.interpolate(f.double(), size=(size, size), mode="bilinear", align_corners=False)[
            ..., top : top + crop, top : top + crop
        ]
        for f in features.values()
    ]
    maps = torch.cat(levels, dim=1)  # (B, C, crop, crop)
    b, c = maps.shape[:2]
    starts = range(0, crop - p + 1, s)
    patches = torch.stack(
        [maps[:, :, i : i + p, j : j + p].reshape(b, c, p * p) for i in starts for j in starts], dim=2
    )  # (B, C, P, d)
    dictionary = model.dictionary_.double()
    x = patches.permute(1, 0, 2, 3).reshape(c, -1, p * p)
    idx, coef = fastad.reference.omp(x, dictionary, model.n_nonzero)
    recon = torch.zeros_like(x)
    for t in range(idx.shape[-1]):
        used = idx[..., t] >= 0
        atoms = torch.gather(dictionary, 1, idx[..., t].clamp_min(0).unsqueeze(-1).expand(-1, -1, p * p))
        recon += torch.where(used.unsqueeze(-1), coef[..., t : t + 1].double() * atoms, 0.0)
    errors = ((x - recon) ** 2).sum(-1).reshape(c, b, -1)  # (C, B, P)
    scores = errors.topk(model.top_k, dim=-1).values.sum(-1).sum(0)
    total = errors.sum(0)  # (B, P)
    acc = torch.zeros(b, crop, crop, dtype=torch.float64)
    count = torch.zeros(crop, crop, dtype=torch.float64)
    for k, (i, j) in enumerate((i, j) for i in starts for j in starts):
        acc[:, i : i + p, j : j + p] += total[:, k, None, None]
        count[i : i + p, j : j + p] += 1
    crop_map = acc / count
    full = F.pad(crop_map.unsqueeze(1), (top, size - crop - top) * 2, mode="replicate")[:, 0]
    return scores, full


VARIANT = {"levels": "resized_maps", "standardize": False, "map_mode": "patch_mean", "dictionary_fit": "streamed_omp"}


def test_earlier_variant_equals_a_float64_reference(rng):
    train, test = images(12, rng), images(3, rng)
    model = lite0(batch_size=5, **VARIANT).fit(train)
    assert model.dictionary_.shape == (64, 5, 64) and model.dictionary_.dtype == torch.float32
    torch.testing.assert_close(model.dictionary_.norm(dim=-1), torch.ones(64, 5))
    with torch.inference_mode():
        patch_map, scores = model._score_batch(test)
    ref_scores, ref_map = reference_scores(model, test)
    assert patch_map.shape == (3, 32, 32)
    # OMP in float32 against float64: a near-tie between atoms may pick another support for a
    # patch now and then, so the sums are compared at 1e-3.
    np.testing.assert_allclose(scores.double().numpy(), ref_scores.numpy(), rtol=1e-3)
    np.testing.assert_allclose(
        patch_map.double().numpy(), ref_map.numpy(), rtol=1e-3, atol=1e-6 * float(ref_map.abs().max())
    )
    prediction = model.predict(test)
    assert prediction.maps.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(prediction.scores, scores)


def test_streamed_omp_dictionaries_come_from_the_streamed_patches(rng):
    from fastad.dictionary import DictionaryLearner

    train = images(6, rng)
    model = lite0(batch_size=6, n_atoms=4, n_nonzero=2, seed=3, dictionary_fit="streamed_omp").fit(train)
    learner = DictionaryLearner(64, 4, 64, 2, batch_size=256, seed=3)
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


@pytest.mark.parametrize(
    "params,message",
    [
        ({"levels": "resized_maps", "cutoff": 13}, "feature_size - 2 cutoff"),
        ({"levels": "pyramid"}, "levels must be one of"),
        ({"map_mode": "mean"}, "map_mode must be one of"),
        ({"dictionary_fit": "ksvd"}, "dictionary_fit must be one of"),
        ({"alpha": 0}, "alpha"),
        ({"cutoff": 5}, "too small for MLF-SC"),
        ({"n_nonzero": 6}, "n_nonzero"),
        ({"n_atoms": 0}, "n_atoms"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_parameters_are_named(rng, params, message):
    with pytest.raises(ValueError, match=message):
        lite0(**params).fit(images(2, rng))


# -- the authors' pipeline, transcribed from LeapMind/MLF-SC (src/preprocessor.py, src/models.py) --


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    """A seeded random VGG-16 saved as a weights file: fastad loads it by path, the transcription
    below runs torchvision's own ``features`` list on it, as the authors' code does."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    network = torchvision.models.vgg16()
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(network.state_dict(), path)
    return path, network.features.eval()


def authors_features(vgg_features, images: torch.Tensor, cutoff: int = 2) -> np.ndarray:
    """VGG16ScaledFeatures: the normalised image max-pooled by 2**s, VGG's modules run up to index
    21 / 14 / 7 (conv4_3 / conv3_3 / conv2_2 outputs), concatenated in that order, edges cut,
    each image's channels standardised with torch's (unbiased) std."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    org = (images - mean) / std
    parts = []
    with torch.no_grad():
        for s, last in ((0, 21), (1, 14), (2, 7)):
            x = F.max_pool2d(org, (2**s, 2**s))
            for i, f in enumerate(vgg_features):
                x = f(x)
                if i == last:
                    parts.append(x)
                    break
    x = torch.cat(parts, dim=1)[:, :, cutoff:-cutoff, cutoff:-cutoff]
    x = (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)
    return x.double().numpy()


def authors_patches(features: np.ndarray, patch: int = 8, stride: int = 2) -> np.ndarray:
    """BatchSplitImg: (N, P, C, patch * patch), patches in raster order."""
    n, c, h, w = features.shape
    out = [
        [
            features[i, :, ty : ty + patch, tx : tx + patch].reshape(c, -1)
            for ty in range(0, h - patch + 1, stride)
            for tx in range(0, w - patch + 1, stride)
        ]
        for i in range(n)
    ]
    return np.asarray(out)


def reorder() -> np.ndarray:
    """fastad keeps VGG's channels in network order (conv2_2, conv3_3, conv4_3); the authors
    concatenate conv4_3, conv3_3, conv2_2. Index array: authors' channel -> fastad's."""
    return np.concatenate([np.arange(384, 896), np.arange(128, 384), np.arange(0, 128)])


def authors_test(dictionaries: list[np.ndarray], patches: np.ndarray, patch: int = 8, stride: int = 2, size: int = 28):
    """SparseCodingWithMultiDict.calculate_error: per channel, scikit-learn's OMP codes (3
    non-zeros), the squared error of every patch, the sum of the 5 largest; the picture from
    patches written over each other in raster order, squared difference / 1.5**2, averaged."""
    from sklearn.decomposition import SparseCoder

    def stitched(arrays):
        out = np.zeros((size, size))
        it = iter(arrays)
        for ty in range(0, size - patch + 1, stride):
            for tx in range(0, size - patch + 1, stride):
                out[ty : ty + patch, tx : tx + patch] = next(it).reshape(patch, patch)
        return out

    scores, pictures = [], []
    for image in patches:  # (P, C, d)
        channel_errors, picture = [], np.zeros((size, size))
        for i, dictionary in enumerate(dictionaries):
            coder = SparseCoder(dictionary=dictionary, transform_algorithm="omp", transform_n_nonzero_coefs=3)
            target = image[:, i]
            rcn = coder.transform(target) @ dictionary
            picture += np.square((stitched(target) - stitched(rcn)) / 1.5)
            channel_errors.append(np.sort(np.sum((target - rcn) ** 2, axis=1))[::-1][:5].sum())
        scores.append(np.sum(channel_errors))
        pictures.append(picture / len(dictionaries))
    return np.asarray(scores), np.asarray(pictures)


def test_defaults_follow_the_authors_pipeline(vgg16_file):
    path, vgg_features = vgg16_file
    model = MLFSC(weights=str(path), holdout=0, dictionary_steps=6)
    # Their input: 256 x 256, no crop; their levels: conv2_2, conv3_3, conv4_3 before the ReLU.
    assert model.transform().output_size(480, 640) == (256, 256)
    gen = torch.Generator().manual_seed(1)
    train, test = images(3, gen), images(2, gen)
    train = F.interpolate(train, size=(256, 256), mode="bilinear", align_corners=False)
    test = F.interpolate(test, size=(256, 256), mode="bilinear", align_corners=False)
    model.fit(train)
    order = reorder()

    # Levels: the transcription's features are fastad's patches, channel for channel.
    theirs = authors_patches(authors_features(vgg_features, test))  # (N, 121, C, 64)
    with torch.inference_mode():
        ours = model.patches(test).double().numpy()  # (C, N * 121, 64)
    ours = ours.reshape(896, 2, 121, 64).transpose(1, 2, 0, 3)[:, :, order]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())

    # Dictionary learning: scikit-learn from the SVD of all the channel's training patches
    # (np.linalg.svd, signs as svd_flip sets them), then mini-batches of 3 over the patches of
    # smallest sampling key (one uniform draw per patch, image by image, from the seed).
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.utils.extmath import svd_flip

    train_patches = authors_patches(authors_features(vgg_features, train)).reshape(-1, 896, 64)  # (N P, C, d)
    generator = torch.Generator().manual_seed(0)
    keys = torch.cat([torch.rand(121, generator=generator, dtype=torch.float64) for _ in range(3)]).numpy()
    sample = np.argsort(keys, kind="stable")[: 6 * 3]
    for authors_channel in (0, 100, 600, 895):
        x = train_patches[:, authors_channel]
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        _, vt = svd_flip(u, vt, u_based_decision=False)
        learner = MiniBatchDictionaryLearning(
            n_components=5,
            alpha=1.0,
            fit_algorithm="lars",
            batch_size=3,
            dict_init=s[:5, None] * vt[:5],
            shuffle=False,
            random_state=0,
        )
        for step in range(6):
            learner.partial_fit(x[sample[3 * step : 3 * step + 3]])
        expected = learner.components_ / np.linalg.norm(learner.components_, axis=1, keepdims=True)
        np.testing.assert_allclose(model.dictionary_[order[authors_channel]].double().numpy(), expected, atol=2e-3)

    # Scoring and the picture, with the model's dictionaries in the authors' channel order, for the
    # first test image (scikit-learn codes one patch at a time: 10 s an image).
    dictionaries = [model.dictionary_[order[i]].double().numpy() for i in range(896)]
    their_scores, their_pictures = authors_test(dictionaries, theirs[:1])
    prediction = model.predict(test)
    with torch.inference_mode():
        patch_map, scores = model._score_batch(test)
    torch.testing.assert_close(prediction.scores, scores)
    patch_map, scores = patch_map[:1], scores[:1]
    # OMP in float32 against scikit-learn's float64: a near-tie may pick another support now
    # and then, so the sums over 896 channels are compared at 1e-3.
    np.testing.assert_allclose(scores.double().numpy(), their_scores, rtol=1e-3)
    interior = patch_map[:, 2:30, 2:30].double().numpy()
    assert np.mean(np.abs(interior - their_pictures) <= 1e-3 * their_pictures.max()) > 0.99
    # The cut-off cells repeat the nearest computed one.
    torch.testing.assert_close(patch_map[:, :2, 2:30], patch_map[:, 2:3, 2:30].expand(-1, 2, -1))


def test_each_default_is_the_authors_and_the_variants_stay_named():
    model = MLFSC()
    expected = {
        "levels": "scaled_inputs",
        "standardize": True,
        "cutoff": 2,
        "patch_size": 8,
        "patch_stride": 2,
        "n_atoms": 5,
        "n_nonzero": 3,
        "top_k": 5,
        "dictionary_fit": "sklearn_lasso",
        "alpha": 1.0,
        "dictionary_steps": 50,
        "map_mode": "last_patch",
        "resize": [256, 256],
        "crop": None,
        "backbone": "vgg16",
        "pre_relu": True,
    }
    assert {name: model.get_params()[name] for name in expected} == expected
    assert model._dictionary_batch() == 3  # scikit-learn 0.21.3's default batch, which the authors used
    assert model._extractor_options() == {"input_pools": {"conv2_2": 4, "conv3_3": 2, "conv4_3": 1}}
    assert model.set_params(levels="resized_maps")._extractor_options() == {}
    assert MLFSC(dictionary_fit="streamed_omp")._dictionary_batch() == 256

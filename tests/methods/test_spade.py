"""SPADE against a slow float64 implementation of the paper on the same features, plus its
options, model files, a pasted defect and bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastad
from fastad.methods import AnomalyModel, get_method
from fastad.methods.spade import SPADE

from ..conftest import require_lite0

require_lite0()

SIZE = 64


def lite0(**kw) -> SPADE:
    kw.setdefault("holdout", 0)
    return SPADE(backbone="efficientnet_lite0", resize=None, crop=None, **kw)


def varied_images(n: int, gen: torch.Generator, size: int = SIZE) -> torch.Tensor:
    """Noise images whose brightness and contrast differ per image, so that the nearest training
    images are chosen by clear margins rather than near-ties."""
    base = torch.rand(n, 1, 1, 1, generator=gen) * 0.6
    contrast = 0.1 + 0.3 * torch.rand(n, 1, 1, 1, generator=gen)
    return (base + contrast * torch.rand(n, 3, size, size, generator=gen)).clamp(0, 1)


def reference_spade(model: SPADE, train: torch.Tensor, test: torch.Tensor, k_images: int, k_features: int):
    """The paper's two stages by definition, in float64 with full distance matrices: returns
    (patch maps (B, h, w), image scores (B,))."""
    with torch.inference_mode():
        train_f = {k: v.double() for k, v in model._features(train).items()}
        test_f = {k: v.double() for k, v in model._features(test).items()}
    image_layer, map_layers = model.image_layer(), model.map_layers()
    image_d = torch.cdist(test_f[image_layer].mean(dim=(2, 3)), train_f[image_layer].mean(dim=(2, 3)))
    nearest_d, nearest = image_d.sort(dim=1)
    nearest_d, nearest = nearest_d[:, :k_images], nearest[:, :k_images]
    maps = []
    for i in range(test.shape[0]):
        per_layer = []
        for layer in map_layers:
            c, h, w = test_f[layer].shape[1:]
            gallery = train_f[layer][nearest[i]].permute(0, 2, 3, 1).reshape(-1, c)
            query = test_f[layer][i].permute(1, 2, 0).reshape(-1, c)
            d = torch.cdist(query, gallery).sort(dim=1).values[:, :k_features].mean(dim=1)
            per_layer.append(d.reshape(1, 1, h, w))
        # The reference code upsamples each layer's map to the image, then averages the layers.
        target = test.shape[-2:] if model.layer_maps == "to_image" else per_layer[0].shape[-2:]
        up = [F.interpolate(m, size=target, mode="bilinear", align_corners=False) for m in per_layer]
        maps.append(torch.cat(up).mean(dim=0)[0])
    return torch.stack(maps), nearest_d.mean(dim=1)


@pytest.mark.parametrize(
    ("k_images", "k_features", "layer_maps"), [(3, 1, "to_image"), (5, 4, "to_image"), (3, 1, "to_first_layer")]
)
def test_scores_and_maps_equal_a_float64_reference(rng, k_images, k_features, layer_maps):
    train, test = varied_images(8, rng), varied_images(3, rng)
    model = lite0(k_images=k_images, k_features=k_features, batch_size=3, layer_maps=layer_maps).fit(train)  # 3 batches
    assert SPADE().layer_maps == "to_image"  # the reference code's way is the default
    assert model.features_["block1"].shape == (8, 24, 16, 16) and model.pooled_.shape == (8, 1280)
    with torch.inference_mode():
        patch_map, scores = model._score_batch(test)
    ref_map, ref_scores = reference_spade(model, train, test, k_images, k_features)
    assert (
        patch_map.shape == ((3, SIZE, SIZE) if layer_maps == "to_image" else (3, 16, 16))
        and patch_map.dtype == torch.float32
    )
    torch.testing.assert_close(patch_map.double(), ref_map, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=1e-4, atol=1e-4)

    prediction = model.predict(test)
    torch.testing.assert_close(prediction.scores, scores)
    assert prediction.maps.shape == (3, SIZE, SIZE)


def test_k_images_beyond_the_training_set_is_clipped(rng):
    train, test = varied_images(5, rng), varied_images(2, rng)
    model = lite0(k_images=50).fit(train)
    clipped = model.predict(test)
    exact = model.set_params(k_images=5).predict(test)
    torch.testing.assert_close(clipped.scores, exact.scores)
    torch.testing.assert_close(clipped.maps, exact.maps)
    _, ref_scores = reference_spade(model, train, test, 5, 1)
    torch.testing.assert_close(clipped.scores.double(), ref_scores, rtol=1e-4, atol=1e-4)


def test_image_score_options(rng):
    train, test = varied_images(6, rng), varied_images(3, rng)
    knn_model = lite0(k_images=3).fit(train)
    by_knn = knn_model.predict(test)
    by_max = knn_model.set_params(image_score="max").predict(test)
    torch.testing.assert_close(by_max.maps, by_knn.maps)  # the option changes the score only
    torch.testing.assert_close(by_max.scores, by_max.maps.amax(dim=(1, 2)))
    with torch.inference_mode():
        _, none = knn_model._score_batch(test)
    assert none is None
    assert not torch.allclose(by_knn.scores, by_max.scores)


def test_model_file_round_trip_gives_identical_predictions(rng, tmp_path):
    train, test = varied_images(6, rng), varied_images(3, rng)
    model = lite0(k_images=4, k_features=2, bank_dtype="float16").fit(train)
    loaded = AnomalyModel.load(model.save(tmp_path / "spade.safetensors"))
    assert type(loaded) is SPADE and loaded.get_params() == model.get_params()
    assert loaded.features_.keys() == model.features_.keys() and torch.equal(loaded.pooled_, model.pooled_)
    for layer, bank in model.features_.items():
        assert loaded.features_[layer].dtype == torch.float16 and torch.equal(loaded.features_[layer], bank)
    before, after = model.predict(test), loaded.predict(test)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)


def test_half_precision_bank_is_close_to_float32(rng):
    train, test = varied_images(6, rng), varied_images(3, rng)
    full = lite0(k_images=3).fit(train)
    expected = full.predict(test)
    for bank_dtype, dtype, tolerance in [("float16", torch.float16, 2e-3), ("bfloat16", torch.bfloat16, 2e-2)]:
        half = lite0(k_images=3, bank_dtype=bank_dtype).fit(train)
        for layer, bank in full.features_.items():
            assert half.features_[layer].dtype == dtype and half.features_[layer].nbytes * 2 == bank.nbytes
        assert half.pooled_.dtype == torch.float32  # the image-level retrieval stays exact
        got = half.predict(test)
        torch.testing.assert_close(got.scores, expected.scores)
        scale = float(expected.maps.abs().max())
        torch.testing.assert_close(got.maps, expected.maps, rtol=tolerance, atol=tolerance * scale)


def test_a_pasted_defect_scores_higher_and_peaks_at_the_defect(np_rng):
    skimage_data = pytest.importorskip(
        "skimage.data", reason="the normal images are scikit-image's bundled grass texture"
    )
    from fastad.data.synthetic import normal_image

    texture = skimage_data.grass()

    def as_tensor(images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255

    train = as_tensor([normal_image(texture, (0.86, 1.04, 0.72), SIZE, np_rng) for _ in range(10)])
    normal = as_tensor([normal_image(texture, (0.86, 1.04, 0.72), SIZE, np_rng) for _ in range(2)])
    defective = normal.clone()
    top, left = (int(v) for v in np_rng.integers(4, SIZE - 20, size=2))
    defective[:, :, top : top + 16, left : left + 16] = 1.0  # a bright 16x16 square

    model = lite0(k_images=5).fit(train)
    clean, bad = model.predict(normal), model.predict(defective)
    assert bool((bad.scores > clean.scores).all())
    assert float(bad.maps.amax()) > float(clean.maps.amax())
    for anomaly_map in bad.maps:
        row, col = divmod(int(anomaly_map.argmax()), SIZE)
        assert top - 4 <= row < top + 20 and left - 4 <= col < left + 20, (row, col, top, left)


def test_layers_defaults_and_registration():
    wide = SPADE()
    assert wide.get_params()["backbone"] == "wide_resnet50_2"
    assert (wide.k_images, wide.k_features, wide.image_score, wide.bank_dtype) == (50, 1, "knn", "float32")
    assert wide.map_layers() == ["layer1", "layer2", "layer3"] and wide.image_layer() == "layer4"
    assert wide.feature_layers() == ["layer1", "layer2", "layer3", "layer4"]
    assert lite0().map_layers() == ["block1", "block2", "block4"] and lite0().image_layer() == "head"
    assert lite0(layers=["head", "block2"]).feature_layers() == ["block2", "head"]
    assert get_method("spade") is SPADE and fastad.SPADE is SPADE


def test_chosen_layers_only_are_stored_and_must_not_change_after_fit(rng):
    train = varied_images(4, rng)
    model = lite0(layers=["block2"], k_images=2).fit(train)
    assert list(model.features_) == ["block2"]
    model.layers = ["block4"]
    with pytest.raises(ValueError, match=r"fitted on layers \['block2'\] but its layers are now \['block4'\]"):
        model.predict(train[:1])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"k_images": 0}, "k_images must be a positive int"),
        ({"k_images": 2.5}, "k_images must be an int"),
        ({"k_images": True}, "k_images must be an int"),
        ({"k_features": 0}, "k_features must be a positive int"),
        ({"image_score": "mean"}, "image_score must be one of 'knn', 'max', got 'mean'"),
        ({"bank_dtype": "float64"}, "bank_dtype must be one of 'float32', 'float16', 'bfloat16', got 'float64'"),
        ({"layer_maps": "mean"}, "layer_maps must be one of"),
        ({"layers": ["layer1"]}, "not all layers of 'efficientnet_lite0'"),
    ],
)
def test_bad_parameters_raise_before_any_work(params, message):
    # A wrong type is a TypeError, a wrong value a ValueError (fastad.checks).
    wrong_type = any(isinstance(v, (bool, float)) for v in params.values())
    with pytest.raises(TypeError if wrong_type else ValueError, match=message):
        lite0(**params).fit(torch.full((2, 3, SIZE, SIZE), 0.5))


def test_training_images_of_two_sizes_and_too_large_k_features_raise(rng):
    mixed = [torch.rand(3, SIZE, SIZE, generator=rng), torch.rand(3, 96, 96, generator=rng)]
    with pytest.raises(ValueError, match="training images of one size, got 64x64 and then 96x96"):
        lite0().fit(mixed)
    model = lite0(layers=["block4"], k_images=1, k_features=17).fit(varied_images(2, rng))  # 1 image x 4x4 positions
    with pytest.raises(ValueError, match="k_features=17 exceeds the 16 gallery features of layer 'block4'"):
        model.predict(varied_images(1, rng))

"""fastad.highres.predict_large: tile by tile at native resolution, equal to the untiled predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastad
from fastad.highres import predict_large, upsample_by_stride
from fastad.postprocess import upsample

from ..conftest import require_lite0

require_lite0()


def scene(height, width, gen):
    """A smooth random texture with a brighter rectangle (a defect) in it, (3, H, W) in [0, 1]."""
    base = torch.rand(1, 3, height // 16 + 1, width // 16 + 1, generator=gen)
    up = F.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)[0]
    image = (0.3 + 0.4 * up + 0.05 * torch.rand(3, height, width, generator=gen)).clamp(0, 1)
    image[:, height // 3 : height // 3 + 40, width // 2 : width // 2 + 60] = 0.95
    return image


@pytest.fixture(scope="module")
def patchcore():
    gen = torch.Generator().manual_seed(0)
    train = torch.stack([scene(192, 192, gen) for _ in range(4)])
    return fastad.PatchCore(backbone="efficientnet_lite0", resize=None, crop=None, holdout=0).fit(train)


def assert_equals_untiled(model, image, tile, map_rtol=1e-5):
    untiled = model.predict(image[None])
    with torch.inference_mode():
        patch_map, _ = model._score_batch(image[None])
    tiled = predict_large(model, image, tile=tile, band=200)
    assert tiled.map.shape == tuple(image.shape[1:]) and tiled.map.dtype == np.float32
    scale = float(untiled.maps.abs().max())
    np.testing.assert_allclose(tiled.patch_map, patch_map[0].numpy(), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(tiled.map, untiled.maps[0].numpy(), rtol=0, atol=map_rtol * scale)
    assert tiled.score == pytest.approx(float(untiled.scores[0]), rel=1e-5)
    return tiled


def test_patchcore_tiled_equals_untiled_on_a_2048_image(patchcore):
    image = scene(2048, 2048, torch.Generator().manual_seed(1))
    assert_equals_untiled(patchcore, image, tile=512)


@pytest.mark.parametrize("size", [(1000, 1512), (520, 1320)])
def test_sides_that_are_not_multiples_of_the_deepest_stride(patchcore, size):
    # Lite0 pads like TensorFlow's "same": windows keep the image's length modulo the deepest
    # stride, or every strided layer would sample another grid (the maps then differ everywhere).
    image = scene(*size, torch.Generator().manual_seed(2))
    assert_equals_untiled(patchcore, image, tile=256)


def test_odd_sides_give_the_same_patch_map_and_score(patchcore):
    # predict upsamples to the image's size; predict_large by exactly the stride, then crops: the
    # same patch map and score, and maps that differ only by that resampling.
    image = scene(999, 1001, torch.Generator().manual_seed(3))
    with torch.inference_mode():
        patch_map, _ = patchcore._score_batch(image[None])
    tiled = predict_large(patchcore, image, tile=256)
    np.testing.assert_allclose(tiled.patch_map, patch_map[0].numpy(), rtol=0, atol=1e-5 * float(patch_map.max()))
    assert tiled.score == pytest.approx(float(patchcore.predict(image[None]).scores[0]), rel=1e-5)


def test_the_map_is_written_into_a_memmap(patchcore, tmp_path):
    image = scene(640, 704, torch.Generator().manual_seed(4))
    out = np.lib.format.open_memmap(tmp_path / "map.npy", mode="w+", dtype=np.float32, shape=(640, 704))
    tiled = predict_large(patchcore, image, tile=256, out=out)
    assert tiled.map is out
    out.flush()
    # Another tile size: other window sizes, so convolutions round differently.
    np.testing.assert_allclose(np.load(tmp_path / "map.npy"), predict_large(patchcore, image, tile=512).map, rtol=1e-5)
    with pytest.raises(ValueError, match="out must be a float32"):
        predict_large(patchcore, image, out=np.zeros((640, 703), np.float32))


@pytest.fixture(scope="module")
def spade():
    gen = torch.Generator().manual_seed(6)
    train = torch.stack([scene(192, 192, gen) for _ in range(5)])
    return fastad.SPADE(backbone="efficientnet_lite0", resize=None, crop=None, holdout=0, k_images=3).fit(train)


@pytest.mark.parametrize("size,image_score", [((1024, 1280), "knn"), ((712, 1000), "max")])
def test_spade_tiled_equals_untiled(spade, size, image_score):
    # The gallery choice pools the stride-32 layer over the whole image (a sum over tiles); the
    # maps combine three layers; "max" takes the image score from the final map.
    spade.image_score = image_score
    image = scene(*size, torch.Generator().manual_seed(7))
    assert_equals_untiled(spade, image, tile=256)


def test_wide_resnet_on_random_weights(rng):
    # The paper's backbone, with a random initialisation (weights=None: an explicit opt-in, for
    # tests and timing; nothing is downloaded): symmetric padding, a larger receptive field.
    torch.manual_seed(0)  # the random initialisation
    model = fastad.PatchCore(backbone="wide_resnet50_2", weights=None, resize=None, crop=None, holdout=0)
    model.fit(torch.stack([scene(128, 128, rng) for _ in range(2)]))
    assert not model.tile_geometry().same_padding
    # 3 x 2 tiles of 384 (the last row shorter) behind a halo of about 200 px: every seam cuts
    # through the field of every layer.
    assert_equals_untiled(model, scene(1024, 768, rng), tile=384)


def test_the_halo_is_measured_once_per_pipeline(monkeypatch):
    # Measuring takes tens of forward passes on probes up to 2048 px: once per process for each
    # pipeline, whichever model instance asks; a pipeline with another reach is measured anew.
    import fastad.highres as highres

    calls = []
    measure = highres.tiling.receptive_field
    monkeypatch.setattr(highres.tiling, "receptive_field", lambda *a, **k: calls.append(1) or measure(*a, **k))
    monkeypatch.setattr(highres, "_MEASURED_HALOS", {})
    params = dict(backbone="efficientnet_lite0", resize=None, crop=None)
    first = fastad.PatchCore(**params).tile_geometry()
    assert fastad.PatchCore(**params, coreset_ratio=0.5).tile_geometry() == first and len(calls) == 1
    wider = fastad.PatchCore(**params, neighbourhood=7).tile_geometry()
    assert len(calls) == 2 and wider.halo > first.halo


def test_methods_that_do_not_tile_say_so(patchcore):
    gen = torch.Generator().manual_seed(5)
    padim = fastad.PaDiM(backbone="efficientnet_lite0", resize=None, crop=None, holdout=0, n_features=8)
    padim.fit(torch.stack([scene(64, 64, gen) for _ in range(3)]))
    with pytest.raises(ValueError, match="does not score images tile by tile"):
        predict_large(padim, scene(256, 256, gen))
    with pytest.raises(ValueError, match="3-channel"):
        predict_large(patchcore, torch.rand(1, 256, 256))


def test_upsampling_by_the_stride_equals_resizing_on_multiples():
    maps = torch.rand(2, 13, 17)
    for mode in ("bilinear", "nearest", "bicubic"):
        torch.testing.assert_close(upsample_by_stride(maps, 8, (104, 136), mode), upsample(maps, (104, 136), mode))
    assert upsample_by_stride(maps, 8, (99, 130), "bilinear").shape == (2, 99, 130)


def test_native_resolution_fit_equals_fit(rng):
    # Two training images of different sizes, read tile by tile: the bank holds the same patches
    # as fitting on each whole image (coreset_ratio=1 keeps all, in the same order).
    from fastad.highres import fit_large

    images = [scene(640, 896, rng), scene(512, 512, rng)]
    params = dict(backbone="efficientnet_lite0", resize=None, crop=None, holdout=0, coreset_ratio=1.0)
    tiled = fit_large(fastad.PatchCore(**params), images, tile=256)
    plain = fastad.PatchCore(**params)
    plain.fit(images[0][None])
    first = plain.bank_
    plain.fit(images[1][None])
    expected = torch.cat([first, plain.bank_])
    assert tiled.n_train_images_ == 2 and tiled.threshold_ is None and tiled.backbone_weights_
    torch.testing.assert_close(tiled.bank_, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit on images tile by tile"):
        fit_large(fastad.PaDiM(backbone="efficientnet_lite0", resize=None, crop=None), images)


def test_spade_native_resolution_fit_equals_fit(rng):
    from fastad.highres import fit_large

    images = torch.stack([scene(384, 448, rng) for _ in range(2)])
    params = dict(backbone="efficientnet_lite0", resize=None, crop=None, holdout=0)
    tiled = fit_large(fastad.SPADE(**params), list(images), tile=128)
    plain = fastad.SPADE(**params).fit(images)
    torch.testing.assert_close(tiled.pooled_, plain.pooled_, rtol=1e-5, atol=1e-5)
    for layer, maps in plain.features_.items():
        torch.testing.assert_close(tiled.features_[layer], maps, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="training images of one size"):
        fit_large(fastad.SPADE(**params), [images[0], scene(384, 416, rng)], tile=128)


def test_plain_maximum_score_and_models_that_resize(patchcore):
    # reweight=False: predict's score is the final map's maximum, and so is predict_large's.
    image = scene(512, 640, torch.Generator().manual_seed(8))
    patchcore.reweight = False
    try:
        assert predict_large(patchcore, image, tile=256).score == pytest.approx(
            float(patchcore.predict(image[None]).scores[0]), rel=1e-5
        )
    finally:
        patchcore.reweight = True
    resizing = fastad.PatchCore(backbone="efficientnet_lite0", holdout=0)  # resize 256, crop 224
    with pytest.raises(ValueError, match="resizes its inputs"):
        predict_large(resizing, image)
    from fastad.highres import fit_large

    with pytest.raises(ValueError, match="resize=None and crop=None"):
        fit_large(resizing, [image])


@pytest.fixture(scope="module")
def mlfsc():
    # The authors' pipeline on Lite0 (80 channels at the paper's strides 2, 4, 8), native size.
    gen = torch.Generator().manual_seed(9)
    train = torch.stack([scene(256, 256, gen) for _ in range(3)])
    return fastad.MLFSC(backbone="efficientnet_lite0", resize=None, crop=None, holdout=0, dictionary_steps=10).fit(
        train
    )


def test_mlfsc_tiled_equals_untiled_on_a_2048_image(mlfsc):
    # The standardisation's statistics come from a first tiled pass over the whole image, the
    # per-channel top 5 from every tile's core, the map from each cell's last covering patch.
    assert mlfsc.tile_geometry().align == 16  # the patch grid's step: 2 cells of 8 pixels
    assert_equals_untiled(mlfsc, scene(2048, 2048, torch.Generator().manual_seed(10)), tile=512)


def test_mlfsc_odd_sides_and_resized_levels(mlfsc):
    # Lite0 pads like "same": the last cell of a side that is not a multiple of 8 exists in both.
    assert_equals_untiled(mlfsc, scene(600, 1000, torch.Generator().manual_seed(11)), tile=256)
    variant = fastad.MLFSC(backbone="efficientnet_lite0", resize=None, crop=None, levels="resized_maps")
    with pytest.raises(ValueError, match="levels='scaled_inputs'"):
        variant.tile_geometry()


def test_mlfsc_native_resolution_fit_equals_fit(rng):
    # The lasso fit sees the Gram matrix of all patches and a keyed sample of them: both are the
    # same whether the images come whole or tile by tile.
    from fastad.highres import fit_large

    images = torch.stack([scene(384, 320, rng) for _ in range(2)])
    model = fastad.MLFSC(backbone="efficientnet_lite0", resize=None, crop=None, holdout=0, dictionary_steps=8)
    plain = model.fit(images).dictionary_.clone()
    tiled = fit_large(model, list(images), tile=128).dictionary_
    torch.testing.assert_close(tiled, plain, rtol=1e-4, atol=1e-4)


def test_spade_and_mlfsc_on_a_resnet_with_random_weights(rng):
    # A ResNet's symmetric padding and max-pooled stem, through SPADE's pooled pass and MLF-SC's
    # pooled inputs, with a random initialisation (weights=None: an explicit opt-in for tests;
    # nothing is downloaded). ResNet-18 rather than the papers' Wide-ResNet-50-2 (PatchCore's test
    # above has it): the same stages and strides at a tenth of the cost. The 3 x 2 tiles of 256
    # cut through every layer's receptive field.
    torch.manual_seed(0)
    train = torch.stack([scene(256, 256, rng) for _ in range(2)])
    spade = fastad.SPADE(backbone="resnet18", weights=None, resize=None, crop=None, holdout=0, k_images=2).fit(train)
    assert spade.map_layers() == ["layer1", "layer2", "layer3"] and spade.image_layer() == "layer4"
    assert not spade.tile_geometry().same_padding
    assert_equals_untiled(spade, scene(768, 512, rng), tile=256)
    # MLF-SC's levels on a ResNet: layer1 (stride 4) from the input max-pooled by 2, layer2 (stride 8).
    mlfsc = fastad.MLFSC(
        backbone="resnet18",
        layers=["layer1", "layer2"],
        weights=None,
        resize=None,
        crop=None,
        holdout=0,
        dictionary_steps=4,
    ).fit(train)
    assert mlfsc._extractor_options() == {"input_pools": {"layer1": 2, "layer2": 1}}
    assert_equals_untiled(mlfsc, scene(768, 512, rng), tile=256)


def test_the_large_scene_benchmark_fits_with_the_settings_it_is_given(tmp_path):
    """``python -m benchmarks.highres_large --set KEY=VALUE``: the setting reaches the fitted model
    (RESULTS.md names the earlier defaults' figures by it), and without one the defaults hold."""
    from benchmarks.highres_large import fit_model
    from fastad.cli_args import parse_sets

    fit_model(tmp_path / "set.safetensors", 512, 0, "patchcore", parse_sets(["embedding=concatenated"]))
    fit_model(tmp_path / "default.safetensors", 512, 0, "patchcore")
    concatenated = fastad.load_model(tmp_path / "set.safetensors")
    default = fastad.load_model(tmp_path / "default.safetensors")
    assert concatenated.embedding == "concatenated" and default.embedding == "per_layer"
    assert concatenated.bank_.shape[1] < default.bank_.shape[1]  # Lite0: 152 against 1024

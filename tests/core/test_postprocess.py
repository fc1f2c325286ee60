"""fastad.postprocess against scipy, torch's own interpolation, a float64 bilinear formula and
numpy, on fresh random inputs; plus the threshold and bad input."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from fastad import postprocess


def random_maps(rng: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=rng, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------------------------
# upsample


@pytest.mark.parametrize("mode", postprocess.UPSAMPLE_MODES)
@pytest.mark.parametrize("with_channel", [False, True], ids=["NHW", "N1HW"])
def test_upsample_matches_interpolate(rng, mode, with_channel):
    maps = random_maps(rng, 3, 7, 5)
    given = maps.unsqueeze(1) if with_channel else maps
    out = postprocess.upsample(given, (29, 23), mode=mode)
    align = {} if mode == "nearest" else {"align_corners": False}
    expected = F.interpolate(maps.unsqueeze(1), size=(29, 23), mode=mode, **align).squeeze(1)
    assert out.shape == (3, 29, 23) and out.dtype == maps.dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of half-pixel linear interpolation (align_corners=False), clamped."""
    weights = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        weights[o, i0] += 1 - frac
        weights[o, i1] += frac
    return weights


def test_bilinear_upsample_matches_float64_formula(rng):
    maps = random_maps(rng, 2, 6, 9, dtype=torch.float64)
    out = postprocess.upsample(maps, (20, 31))
    rows, cols = linear_resize_matrix(6, 20), linear_resize_matrix(9, 31)
    expected = np.einsum("oh,nhw,pw->nop", rows, maps.numpy(), cols)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_nearest_upsample_by_an_integer_factor_repeats_pixels(rng):
    maps = random_maps(rng, 2, 4, 3)
    out = postprocess.upsample(maps, (12, 6), mode="nearest")
    torch.testing.assert_close(out, maps.repeat_interleave(3, dim=1).repeat_interleave(2, dim=2), rtol=0, atol=0)


def test_upsample_int_size_is_square(rng):
    assert postprocess.upsample(random_maps(rng, 1, 3, 4), 10).shape == (1, 10, 10)


def test_upsample_rejects_bad_input(rng):
    maps = random_maps(rng, 2, 4, 4)
    with pytest.raises(ValueError, match="'bilinear', 'nearest', 'bicubic'"):
        postprocess.upsample(maps, 8, mode="area")
    with pytest.raises(ValueError, match=r"maps must be \(N, h, w\) or \(N, 1, h, w\)"):
        postprocess.upsample(maps.unsqueeze(1).expand(2, 3, 4, 4), 8)
    with pytest.raises(ValueError, match=r"maps must be \(N, h, w\)"):
        postprocess.upsample(maps[0, 0], 8)
    with pytest.raises(TypeError, match="floating-point"):
        postprocess.upsample(maps.long(), 8)
    with pytest.raises(TypeError, match="torch.Tensor"):
        postprocess.upsample(maps.numpy(), 8)
    for bad in (0, (8, -1)):
        with pytest.raises(ValueError, match="size must be positive"):
            postprocess.upsample(maps, bad)
    with pytest.raises(ValueError, match="size must be an int or a pair"):
        postprocess.upsample(maps, (8, 8, 8))
    with pytest.raises(TypeError, match="size must hold ints"):
        postprocess.upsample(maps, (8.0, 8))


# ----------------------------------------------------------------------------------------------
# gaussian_blur


@pytest.mark.parametrize("sigma", [4.0, 1.5, 0.6, "random"])
def test_gaussian_blur_matches_scipy_mirror(rng, sigma):
    if sigma == "random":
        sigma = 0.3 + 4 * torch.rand(1, generator=rng).item()
    maps = random_maps(rng, 3, 41, 37)
    out = postprocess.gaussian_blur(maps, sigma)
    # torch's "reflect" padding (edge not repeated) is scipy's "mirror".
    expected = scipy.ndimage.gaussian_filter(maps.double().numpy(), sigma, truncate=4.0, mode="mirror", axes=(1, 2))
    assert out.shape == maps.shape and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 1100, 37), (1, 29, 1030)])
def test_gaussian_blur_of_long_maps_matches_scipy_mirror(rng, shape):
    # A side beyond the banded-matrix limit takes the depthwise-convolution path.
    assert max(shape[1:]) > postprocess._BANDED_MAX_SIDE
    maps = random_maps(rng, *shape)
    expected = scipy.ndimage.gaussian_filter(maps.double().numpy(), 2.5, truncate=4.0, mode="mirror", axes=(1, 2))
    np.testing.assert_allclose(postprocess.gaussian_blur(maps, 2.5).numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 40, 40), (0, 40, 1100)])
def test_gaussian_blur_of_no_maps_is_empty(shape):
    maps = torch.zeros(shape)
    assert postprocess.gaussian_blur(maps, 4.0).shape == shape


def test_gaussian_blur_border_is_not_scipy_reflect(rng):
    # The other convention (edge pixel repeated) differs near the borders: the test above would
    # notice a change of padding.
    maps = random_maps(rng, 1, 30, 30)
    out = postprocess.gaussian_blur(maps, 2.0).numpy()
    other = scipy.ndimage.gaussian_filter(maps.double().numpy(), 2.0, truncate=4.0, mode="reflect", axes=(1, 2))
    assert np.abs(out - other).max() > 1e-3


def test_gaussian_blur_float64_is_exact(rng):
    maps = random_maps(rng, 2, 25, 19, dtype=torch.float64)
    out = postprocess.gaussian_blur(maps, 3.0)
    expected = scipy.ndimage.gaussian_filter(maps.numpy(), 3.0, truncate=4.0, mode="mirror", axes=(1, 2))
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)


def test_gaussian_blur_sigma_zero_returns_input(rng):
    maps = random_maps(rng, 2, 5, 5)
    assert postprocess.gaussian_blur(maps, 0) is maps


def test_gaussian_blur_rejects_bad_input(rng):
    maps = random_maps(rng, 2, 20, 20)
    with pytest.raises(ValueError, match=r"maps must be \(N, H, W\)"):
        postprocess.gaussian_blur(maps[0], 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        postprocess.gaussian_blur(maps.int(), 1.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
            postprocess.gaussian_blur(maps, bad)
    with pytest.raises(TypeError, match="sigma must be a number"):
        postprocess.gaussian_blur(maps, "4")
    # sigma 4 has radius 16: reflect padding needs maps larger than that.
    with pytest.raises(ValueError, match="larger than its kernel radius 16"):
        postprocess.gaussian_blur(random_maps(rng, 1, 16, 40), 4.0)


def test_gaussian_blur_needs_no_torchvision(rng, monkeypatch):
    # A None entry in sys.modules makes any import of torchvision fail, as on a CPU-only build.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    maps = random_maps(rng, 1, 20, 20)
    expected = scipy.ndimage.gaussian_filter(maps.double().numpy(), 1.0, truncate=4.0, mode="mirror", axes=(1, 2))
    np.testing.assert_allclose(postprocess.gaussian_blur(maps, 1.0).numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sigma", [4.0, 0.8])
def test_gaussian_blur_equals_torchvision(rng, sigma):
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    maps = random_maps(rng, 3, 50, 43)
    size = 2 * int(4 * sigma + 0.5) + 1
    expected = tvf.gaussian_blur(maps, kernel_size=[size, size], sigma=[sigma, sigma])
    torch.testing.assert_close(postprocess.gaussian_blur(maps, sigma), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# anomaly_maps


@pytest.mark.parametrize("mode", postprocess.UPSAMPLE_MODES)
def test_anomaly_maps_is_upsample_then_blur(rng, mode):
    patches = random_maps(rng, 2, 8, 8)
    out = postprocess.anomaly_maps(patches, (64, 48), mode=mode, sigma=4.0)
    up = F.interpolate(
        patches.unsqueeze(1), size=(64, 48), mode=mode, **({} if mode == "nearest" else {"align_corners": False})
    )
    expected = scipy.ndimage.gaussian_filter(
        up.squeeze(1).double().numpy(), 4.0, truncate=4.0, mode="mirror", axes=(1, 2)
    )
    assert out.shape == (2, 64, 48)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)


def test_anomaly_maps_without_blur_is_upsample(rng):
    patches = random_maps(rng, 2, 4, 4)
    torch.testing.assert_close(
        postprocess.anomaly_maps(patches, 16, sigma=0), postprocess.upsample(patches, 16), rtol=0, atol=0
    )


# ----------------------------------------------------------------------------------------------
# image_scores


def test_image_scores_match_numpy(rng):
    maps = random_maps(rng, 5, 13, 11)
    flat = maps.double().numpy().reshape(5, -1)
    np.testing.assert_allclose(postprocess.image_scores(maps, "max").numpy(), flat.max(axis=1), rtol=0, atol=0)
    np.testing.assert_allclose(postprocess.image_scores(maps, "mean").numpy(), flat.mean(axis=1), rtol=1e-6, atol=1e-6)
    for fraction in (0.05, 0.3, 1.0):
        k = math.ceil(fraction * 143)
        expected = np.sort(flat, axis=1)[:, -k:].mean(axis=1)
        got = postprocess.image_scores(maps, "topk_mean", fraction=fraction).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert postprocess.image_scores(maps).shape == (5,)


def test_image_scores_topk_edges(rng):
    maps = random_maps(rng, 3, 10, 10)
    tiny = postprocess.image_scores(maps, "topk_mean", fraction=1e-9)  # k = 1
    torch.testing.assert_close(tiny, maps.flatten(1).amax(1), rtol=0, atol=0)
    torch.testing.assert_close(
        postprocess.image_scores(maps, "topk_mean", fraction=1.0), maps.flatten(1).mean(1), rtol=1e-6, atol=1e-6
    )


def test_image_scores_reject_bad_input(rng):
    maps = random_maps(rng, 2, 4, 4)
    with pytest.raises(ValueError, match="'max', 'mean', 'topk_mean'"):
        postprocess.image_scores(maps, "median")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction must be in"):
            postprocess.image_scores(maps, "topk_mean", fraction=bad)
    with pytest.raises(ValueError, match="at least 2-D"):
        postprocess.image_scores(maps[0, 0])
    with pytest.raises(ValueError, match="no pixels"):
        postprocess.image_scores(maps[:, :0])
    with pytest.raises(TypeError, match="floating-point"):
        postprocess.image_scores(maps.long())


# ----------------------------------------------------------------------------------------------
# Threshold


def test_good_quantile_threshold_matches_numpy(rng):
    scores = random_maps(rng, 101, dtype=torch.float64)
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        expected = float(np.quantile(scores.numpy(), q))
        assert postprocess.good_quantile_threshold(scores, q) == pytest.approx(expected, rel=1e-15)
        assert postprocess.good_quantile_threshold(scores.numpy(), q) == pytest.approx(expected, rel=1e-15)
    # With 101 scores the 0.9 quantile is the 91st smallest: 10 normal scores lie above it.
    threshold = postprocess.good_quantile_threshold(scores, 0.9)
    assert int((scores > threshold).sum()) == 10
    assert postprocess.good_quantile_threshold([3.0]) == 3.0


def test_good_quantile_threshold_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        postprocess.good_quantile_threshold([])
    with pytest.raises(ValueError, match="1-D"):
        postprocess.good_quantile_threshold(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        postprocess.good_quantile_threshold(torch.tensor([1.0, float("nan")]))
    for bad in (-0.1, 1.01):
        with pytest.raises(ValueError, match=r"quantile must be in \[0, 1\]"):
            postprocess.good_quantile_threshold([1.0, 2.0], bad)
    with pytest.raises(TypeError, match="quantile must be a number"):
        postprocess.good_quantile_threshold([1.0, 2.0], "0.9")
    with pytest.raises(TypeError, match="real numbers"):
        postprocess.good_quantile_threshold(["a", "b"])

"""ResizeCrop: image against PIL's resize, mask against a direct centre-sampling loop, alignment of
the two, torchvision parity where torchvision is installed, and argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from fastad.data import ResizeCrop

# (input H, W), resize, crop: downscale by a non-integer factor, upscale, shorter side of a
# portrait and a landscape image, crop only, and an identity resize.
CASES = [
    ((61, 83), (40, 50), None),
    ((61, 83), (97, 130), (90, 101)),
    ((83, 61), 32, 30),
    ((61, 83), 45, (44, 57)),
    ((64, 64), None, (33, 20)),
    ((40, 30), (40, 30), None),
]


def _smooth_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask with a few large smooth regions (so that it has real boundaries)."""
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma=min(shape) / 10)
    return noise > 0


def _item(rng: np.random.Generator, shape: tuple[int, int]) -> dict:
    mask = _smooth_mask(rng, shape)
    image = rng.random((3, *shape)).astype(np.float32)
    image[0] = mask  # the red channel is the mask: it must follow the mask exactly
    return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask), "label": 1, "path": "x.png"}


def _pil_resize(channel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL's bilinear resize of a float image (it widens the filter when shrinking, i.e.
    antialiases): an implementation independent of torch's."""
    resized = Image.fromarray(channel.astype(np.float32)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def _nearest_centres(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Each output pixel takes the input pixel under its centre, written as a plain loop."""
    in_h, in_w = mask.shape
    out = np.zeros(size, dtype=bool)
    for i in range(size[0]):
        for j in range(size[1]):
            source_row = min(in_h - 1, int((i + 0.5) * in_h / size[0]))
            source_col = min(in_w - 1, int((j + 0.5) * in_w / size[1]))
            out[i, j] = mask[source_row, source_col]
    return out


def _expected_size(shape: tuple[int, int], resize) -> tuple[int, int]:
    if resize is None:
        return shape
    if isinstance(resize, tuple):
        return resize
    h, w = shape
    return (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)


def _centre(array: np.ndarray, crop) -> np.ndarray:
    if crop is None:
        return array
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    h, w = array.shape[-2:]
    top, left = round((h - ch) / 2), round((w - cw) / 2)
    return array[..., top : top + ch, left : left + cw]


@pytest.mark.parametrize(("shape", "resize", "crop"), CASES)
def test_against_independent_references(np_rng: np.random.Generator, shape, resize, crop) -> None:
    item = _item(np_rng, shape)
    out = ResizeCrop(resize, crop)(item)
    size = _expected_size(shape, resize)
    image = item["image"].numpy()
    if size != shape:
        image = np.stack([_pil_resize(channel, size) for channel in image])
    mask = _nearest_centres(item["mask"].numpy(), size)
    np.testing.assert_allclose(out["image"].numpy(), _centre(image, crop), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out["mask"].numpy(), _centre(mask, crop))
    assert out["image"].dtype == torch.float32 and out["mask"].dtype == torch.bool
    assert out["image"].is_contiguous() and out["mask"].is_contiguous()
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
    assert out["image"].shape[1:] == out["mask"].shape == ResizeCrop(resize, crop).output_size(*shape)
    assert out["label"] == 1 and out["path"] == "x.png"


def _mixed_footprints(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """For each pixel of the resized grid, whether the input pixels its bilinear filter can reach
    hold both mask values. The filter reaches max(1, scale) input pixels either side of the
    output pixel's centre (antialiasing widens it when shrinking); the bound is taken generously
    (whole pixels, inclusive), so a pixel called pure here is pure for certain."""
    in_h, in_w = mask.shape

    def reach(out_index: int, in_size: int, out_size: int) -> slice:
        scale = in_size / out_size
        centre = (out_index + 0.5) * scale - 0.5
        radius = max(1.0, scale)
        return slice(max(0, int(np.floor(centre - radius))), min(in_size, int(np.ceil(centre + radius)) + 1))

    mixed = np.zeros(size, dtype=bool)
    for i in range(size[0]):
        rows = reach(i, in_h, size[0])
        for j in range(size[1]):
            footprint = mask[rows, reach(j, in_w, size[1])]
            mixed[i, j] = footprint.any() and not footprint.all()
    return mixed


@pytest.mark.parametrize(("shape", "resize", "crop"), CASES)
def test_image_and_mask_stay_aligned(np_rng: np.random.Generator, shape, resize, crop) -> None:
    item = _item(np_rng, shape)
    before = {key: value.clone() for key, value in item.items() if isinstance(value, torch.Tensor)}
    out = ResizeCrop(resize, crop)(item)
    red_says = out["image"][0].numpy() > 0.5
    mask = out["mask"].numpy()
    size = _expected_size(shape, resize)
    if size == shape:  # no resampling: the red channel is the mask, pixel for pixel
        np.testing.assert_array_equal(red_says, mask)
    else:
        # Where every input pixel the filter reaches has one mask value, the blended red channel
        # is that value and so is the nearest sample: the two must agree. Only pixels whose
        # footprint straddles the mask's edge may disagree (thin features included, which a
        # dilation of the output mask would not cover).
        mixed = _centre(_mixed_footprints(item["mask"].numpy(), size), crop)
        disagree = red_says != mask
        assert not (disagree & ~mixed).any(), f"{int((disagree & ~mixed).sum())} pixels misaligned"
        assert mixed.sum() < 0.75 * mask.size  # the check above is not vacuous (at most ~51 % mixed seen)
    for key, value in before.items():  # the input item is not modified
        assert torch.equal(item[key], value)


@pytest.mark.parametrize(("shape", "resize", "crop"), CASES)
def test_matches_torchvision(np_rng: np.random.Generator, shape, resize, crop) -> None:
    tv = pytest.importorskip("torchvision.transforms.v2.functional", reason="torchvision is not installed")
    item = _item(np_rng, shape)
    out = ResizeCrop(resize, crop)(item)
    image, mask = item["image"], item["mask"][None].to(torch.uint8)
    if resize is not None:
        size = [resize] if isinstance(resize, int) else list(resize)
        image = tv.resize(image, size, interpolation=tv.InterpolationMode.BILINEAR, antialias=True)
        mask = tv.resize(mask, size, interpolation=tv.InterpolationMode.NEAREST_EXACT)
    if crop is not None:
        crop_size = [crop] if isinstance(crop, int) else list(crop)
        image, mask = tv.center_crop(image, crop_size), tv.center_crop(mask, crop_size)
    torch.testing.assert_close(out["image"], image, rtol=0, atol=1e-6)
    assert torch.equal(out["mask"], mask[0].bool())


def test_identity_and_missing_mask(np_rng: np.random.Generator) -> None:
    item = _item(np_rng, (20, 30))
    out = ResizeCrop()(item)
    assert torch.equal(out["image"], item["image"]) and torch.equal(out["mask"], item["mask"])
    no_mask = {"image": item["image"]}
    assert ResizeCrop((10, 12))(no_mask)["image"].shape == (3, 10, 12)
    assert "mask" not in ResizeCrop((10, 12))(no_mask)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "224", (224,), (224, 0), (1, 2, 3), (224.0, 224)])
def test_rejects_bad_sizes(bad) -> None:
    with pytest.raises(ValueError, match="resize"):
        ResizeCrop(resize=bad)
    with pytest.raises(ValueError, match="crop"):
        ResizeCrop(crop=bad)


def test_rejects_crop_larger_than_resized() -> None:
    with pytest.raises(ValueError, match=r"crop 40x30.*larger.*32x64"):
        ResizeCrop(resize=(32, 64), crop=(40, 30))
    transform = ResizeCrop(resize=32, crop=40)  # size known only per image
    with pytest.raises(ValueError, match="crop 40x40.*larger"):
        transform({"image": torch.zeros(3, 50, 100), "mask": torch.zeros(50, 100, dtype=torch.bool)})
    with pytest.raises(ValueError, match="larger"):
        ResizeCrop(crop=(10, 200))({"image": torch.zeros(3, 50, 100)})


def test_rejects_bad_items() -> None:
    with pytest.raises(ValueError, match=r"item\['image'\]"):
        ResizeCrop(8)({"image": torch.zeros(50, 100)})
    with pytest.raises(ValueError, match=r"item\['image'\]"):
        ResizeCrop(8)({"image": torch.zeros(3, 50, 100, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"item\['mask'\]"):
        ResizeCrop(8)({"image": torch.zeros(3, 50, 100), "mask": torch.zeros(50, 99, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"item\['mask'\]"):
        ResizeCrop(8)({"image": torch.zeros(3, 50, 100), "mask": torch.zeros(50, 100)})

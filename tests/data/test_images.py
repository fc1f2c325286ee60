"""load_image / load_mask: every storage mode written by PIL, checked against numpy of the source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastad.data import load_image, load_mask

H, W = 23, 31  # odd, non-square: catches transposed axes


def _expected_rgb(rgb: np.ndarray) -> np.ndarray:
    """(3, H, W) float32 in [0, 1] from an (H, W, 3) uint8 array, computed in numpy."""
    return (rgb.astype(np.float32) / np.float32(255)).transpose(2, 0, 1)


def _stored_mode(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def _stored_info(path: Path) -> dict:
    with Image.open(path) as image:
        return dict(image.info)


def _check_image(tensor: torch.Tensor, expected: np.ndarray, atol: float = 0.0) -> None:
    assert tensor.dtype == torch.float32
    assert tensor.shape == expected.shape
    assert tensor.is_contiguous()
    np.testing.assert_allclose(tensor.numpy(), expected, rtol=0, atol=atol)


# ----------------------------------------------------------------------------- modes


def test_rgb_png_exact(tmp_path: Path, np_rng: np.random.Generator) -> None:
    rgb = np_rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    _check_image(load_image(tmp_path / "rgb.png"), _expected_rgb(rgb))


def test_gray_l_repeated_over_channels(tmp_path: Path, np_rng: np.random.Generator) -> None:
    gray = np_rng.integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert _stored_mode(tmp_path / "gray.png") == "L"
    _check_image(load_image(str(tmp_path / "gray.png")), _expected_rgb(np.stack([gray] * 3, axis=-1)))


def test_bilevel_mode_1(tmp_path: Path, np_rng: np.random.Generator) -> None:
    bits = np_rng.random((H, W)) < 0.5
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert _stored_mode(tmp_path / "bits.png") == "1"
    _check_image(load_image(tmp_path / "bits.png"), np.broadcast_to(bits.astype(np.float32), (3, H, W)))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_gray_keeps_all_bits(tmp_path: Path, np_rng: np.random.Generator, suffix: str) -> None:
    values = np_rng.integers(0, 65536, (H, W), dtype=np.uint16)
    values[0, :3] = [0, 1, 65535]  # the extremes and the smallest step
    path = tmp_path / f"gray16{suffix}"
    Image.fromarray(values).save(path)
    assert _stored_mode(path).startswith("I;16")
    image = load_image(path)
    expected = values.astype(np.float64) / 65535
    np.testing.assert_allclose(image[0].numpy(), expected, rtol=0, atol=1e-7)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert image[0, 0, 1].item() > 0  # 1/65535 survives: not reduced to 8 bits
    assert len(torch.unique(image[0])) > 256


def test_32_bit_int_holding_16_bit_values(tmp_path: Path, np_rng: np.random.Generator) -> None:
    values = np_rng.integers(0, 65536, (H, W)).astype(np.int32)
    Image.fromarray(values).save(tmp_path / "int32.tif")
    assert _stored_mode(tmp_path / "int32.tif") == "I"
    np.testing.assert_allclose(load_image(tmp_path / "int32.tif")[0].numpy(), values / 65535, rtol=0, atol=1e-7)


def test_32_bit_int_beyond_16_bits_rejected(tmp_path: Path) -> None:
    values = np.full((H, W), 70000, dtype=np.int32)
    Image.fromarray(values).save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match=r"big\.tif.*16-bit"):
        load_image(tmp_path / "big.tif")


def test_float_image_rejected(tmp_path: Path, np_rng: np.random.Generator) -> None:
    Image.fromarray(np_rng.random((H, W)).astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"float\.tif.*'F'"):
        load_image(tmp_path / "float.tif")


def test_rgba_alpha_dropped_not_composited(tmp_path: Path, np_rng: np.random.Generator) -> None:
    rgba = np_rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: compositing would change every colour
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    _check_image(load_image(tmp_path / "rgba.png"), _expected_rgb(rgba[..., :3]))


def test_la_alpha_dropped(tmp_path: Path, np_rng: np.random.Generator) -> None:
    la = np_rng.integers(0, 256, (H, W, 2), dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert _stored_mode(tmp_path / "la.png") == "LA"
    _check_image(load_image(tmp_path / "la.png"), _expected_rgb(np.stack([la[..., 0]] * 3, axis=-1)))


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_looked_up(tmp_path: Path, np_rng: np.random.Generator, transparency: bool) -> None:
    palette = np_rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = np_rng.integers(0, 256, (H, W), dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.ravel().tolist())
    options = {"transparency": int(indices[0, 0])} if transparency else {}
    image.save(tmp_path / "palette.png", **options)
    assert (_stored_info(tmp_path / "palette.png").get("transparency") is not None) == transparency
    # Reference: the palette lookup done in numpy; transparent pixels keep their palette colour.
    _check_image(load_image(tmp_path / "palette.png"), _expected_rgb(palette[indices]))


def test_cmyk(tmp_path: Path, np_rng: np.random.Generator) -> None:
    cmyk = np_rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.tif")
    assert _stored_mode(tmp_path / "cmyk.tif") == "CMYK"
    # Plain (profile-free) conversion: each channel is (255 - ink) * (255 - black) / 255.
    ink = cmyk[..., :3].astype(np.float64)
    black = cmyk[..., 3:].astype(np.float64)
    expected = (255 - ink) * (255 - black) / 255 / 255
    _check_image(load_image(tmp_path / "cmyk.tif"), expected.transpose(2, 0, 1).astype(np.float32), atol=1.01 / 255)


def _oriented(pixels: np.ndarray, orientation: int) -> Image.Image:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation  # the EXIF Orientation tag
    image.info["exif"] = exif.tobytes()
    return image


# EXIF orientation -> numpy view of the stored pixels as a viewer shows them.
_UPRIGHT = {
    3: lambda a: np.rot90(a, 2),  # rotated 180
    6: lambda a: np.rot90(a, -1),  # shown rotated 90 clockwise
    8: lambda a: np.rot90(a, 1),  # shown rotated 90 counter-clockwise
    2: lambda a: a[:, ::-1],  # mirrored
}


@pytest.mark.parametrize("orientation", sorted(_UPRIGHT))
def test_exif_orientation_png_exact(tmp_path: Path, np_rng: np.random.Generator, orientation: int) -> None:
    rgb = np_rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    image = _oriented(rgb, orientation)
    image.save(tmp_path / "oriented.png", exif=image.info["exif"])
    upright = np.ascontiguousarray(_UPRIGHT[orientation](rgb))
    _check_image(load_image(tmp_path / "oriented.png"), _expected_rgb(upright))


def test_exif_rotated_jpeg_comes_out_rotated(tmp_path: Path) -> None:
    # A smooth, clearly asymmetric picture, so that JPEG loss stays far below the difference
    # between the right rotation and the wrong ones.
    yy, xx = np.mgrid[0:48, 0:80].astype(np.float64)
    rgb = np.stack([xx / 79 * 255, yy / 47 * 255, (xx + yy) / 126 * 255], axis=-1).round().astype(np.uint8)
    image = _oriented(rgb, 6)
    image.save(tmp_path / "photo.jpg", exif=image.info["exif"], quality=95)
    loaded = load_image(tmp_path / "photo.jpg").numpy()
    assert loaded.shape == (3, 80, 48)
    error = np.abs(loaded - _expected_rgb(np.ascontiguousarray(np.rot90(rgb, -1)))).mean()
    wrong_way = np.abs(loaded - _expected_rgb(np.ascontiguousarray(np.rot90(rgb, 1)))).mean()
    assert error < 0.02 < wrong_way


# ----------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        load_image(tmp_path / "nowhere.png")
    with pytest.raises(FileNotFoundError, match="nowhere_mask.png"):
        load_mask(tmp_path / "nowhere_mask.png")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.png.*empty|empty.*empty\.png"):
        load_image(tmp_path / "empty.png")


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("this is text with a .png name\n")
    with pytest.raises(ValueError, match=r"notes\.png"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ValueError, match=r"notes\.png"):
        load_mask(tmp_path / "notes.png")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ValueError, match=r"folder\.png"):
        load_image(tmp_path / "folder.png")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path: Path, np_rng: np.random.Generator, suffix: str) -> None:
    rgb = np_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(rgb).save(whole)
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    # The header is intact, so Image.open alone succeeds: only full decoding finds the damage.
    with Image.open(cut):
        pass
    with pytest.raises(ValueError, match=rf"cut\{suffix}.*truncated"):
        load_image(cut)


# ----------------------------------------------------------------------------- masks


def test_mask_8_bit_threshold(tmp_path: Path, np_rng: np.random.Generator) -> None:
    values = np_rng.integers(0, 256, (H, W), dtype=np.uint8)
    values[0, :4] = [127, 128, 0, 255]
    Image.fromarray(values).save(tmp_path / "mask.png")
    mask = load_mask(tmp_path / "mask.png")
    assert mask.dtype == torch.bool and mask.shape == (H, W)
    np.testing.assert_array_equal(mask.numpy(), values >= 128)


def test_mask_with_low_edge_values(tmp_path: Path) -> None:
    # Like the magnetic-tile masks: a 0/255 square with faint values ringing around it.
    values = np.zeros((H, W), dtype=np.uint8)
    values[5:15, 5:15] = 255
    values[4, 5:15] = 3
    values[15, 5:15] = 60
    values[5:15, 15] = 127
    Image.fromarray(values).save(tmp_path / "ringing_mask.png")
    expected = np.zeros((H, W), dtype=bool)
    expected[5:15, 5:15] = True
    np.testing.assert_array_equal(load_mask(tmp_path / "ringing_mask.png").numpy(), expected)


def test_mask_16_bit(tmp_path: Path, np_rng: np.random.Generator) -> None:
    values = np_rng.integers(0, 65536, (H, W), dtype=np.uint16)
    values[0, :2] = [32767, 32768]  # the 8-bit 127 / 128 boundary in 16 bits
    Image.fromarray(values).save(tmp_path / "mask16.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "mask16.png").numpy(), values >= 32768)


def test_mask_colour_bilevel_palette_alpha(tmp_path: Path, np_rng: np.random.Generator) -> None:
    truth = np_rng.random((H, W)) < 0.4
    white_on_black = np.where(truth[..., None], 255, 0).astype(np.uint8).repeat(3, axis=-1)
    Image.fromarray(white_on_black).save(tmp_path / "rgb_mask.png")
    Image.fromarray(truth).save(tmp_path / "bits_mask.png")
    Image.fromarray(white_on_black).convert("P").save(tmp_path / "palette_mask.png")
    rgba = np.concatenate([white_on_black, np.zeros((H, W, 1), np.uint8)], axis=-1)  # alpha 0 everywhere
    Image.fromarray(rgba).save(tmp_path / "rgba_mask.png")
    for name in ("rgb_mask.png", "bits_mask.png", "palette_mask.png", "rgba_mask.png"):
        mask = load_mask(tmp_path / name)
        assert mask.dtype == torch.bool, name
        np.testing.assert_array_equal(mask.numpy(), truth, err_msg=name)

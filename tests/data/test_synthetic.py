"""Synthetic defects: exact masks, determinism, atomic writing, and a layout MVTecDataset reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastad.data import DEFECT_KINDS, TEXTURES, MVTecDataset, add_defect, make_synthetic_dataset, synthetic

SMALL = {"size": 64, "n_train": 3, "n_test_good": 2, "n_test_per_defect": 2}


def _texture_image(np_rng: np.random.Generator, size: int = 64) -> np.ndarray:
    texture = synthetic._load_texture(TEXTURES[int(np_rng.integers(len(TEXTURES)))])
    return synthetic.normal_image(texture, (1.0, 0.9, 0.8), size, np_rng)


def _images(np_rng: np.random.Generator) -> list[np.ndarray]:
    """A texture crop, noise, non-square noise, and the flat extremes (where a darkening or
    brightening blend cannot change a pixel by itself)."""
    return [
        _texture_image(np_rng),
        np_rng.integers(0, 256, (48, 48, 3), dtype=np.uint8),
        np_rng.integers(0, 256, (40, 90, 3), dtype=np.uint8),
        np.zeros((32, 32, 3), dtype=np.uint8),
        np.full((32, 32, 3), 255, dtype=np.uint8),
    ]


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_mask_is_exactly_the_changed_pixels(np_rng: np.random.Generator, kind: str) -> None:
    for image in _images(np_rng):
        original = image.copy()
        for _ in range(3):
            defective, mask = add_defect(image, kind, np_rng)
            assert defective.dtype == np.uint8 and defective.shape == image.shape
            assert mask.dtype == bool and mask.shape == image.shape[:2]
            changed = np.any(defective != image, axis=-1)
            np.testing.assert_array_equal(changed, mask)  # outside identical, inside all differ
            assert 0 < mask.sum() < 0.5 * mask.size
            np.testing.assert_array_equal(image, original)  # the input is not modified


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_depends_only_on_the_generator(np_rng: np.random.Generator, kind: str) -> None:
    image = _texture_image(np_rng)
    seed = int(np_rng.integers(2**32))
    first = add_defect(image, kind, np.random.default_rng(seed))
    second = add_defect(image, kind, np.random.default_rng(seed))
    other = add_defect(image, kind, np.random.default_rng(seed + 1))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[1], other[1])


def test_kinds_look_like_their_names(np_rng: np.random.Generator) -> None:
    image = _texture_image(np_rng, size=128)
    # A scratch is thin: almost every pixel of it touches the outside. A blob is compact. Single
    # draws overlap a little (over 300 draws: scratches up to 0.27, the smallest blobs 0.45), so
    # compare the medians of five of each.
    from scipy import ndimage

    def interior_fraction(mask: np.ndarray) -> float:
        return ndimage.binary_erosion(mask, np.ones((3, 3))).sum() / mask.sum()

    scratch = np.median([interior_fraction(add_defect(image, "scratch", np_rng)[1]) for _ in range(5)])
    blob = np.median([interior_fraction(add_defect(image, "blob", np_rng)[1]) for _ in range(5)])
    assert scratch < 0.4 < blob
    missing, hole = add_defect(image, "missing", np_rng)
    assert len(np.unique(missing[hole], axis=0)) <= 2  # flat fill (plus the rare nudged pixel)
    shifted, patch = add_defect(image, "color", np_rng)
    brightness_change = np.abs(shifted[patch].astype(float).mean(1) - image[patch].astype(float).mean(1))
    assert np.median(brightness_change) < 3  # a hue shift, not a brightness change


def test_add_defect_rejects_bad_input(np_rng: np.random.Generator) -> None:
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="kind.*'crack'"):
        add_defect(image, "crack", np_rng)
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\).*float"):
        add_defect(image.astype(np.float32), "blob", np_rng)
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        add_defect(image[..., 0], "blob", np_rng)
    with pytest.raises(ValueError, match="at least 16x16.*8x32"):
        add_defect(image[:8], "blob", np_rng)
    with pytest.raises(TypeError, match="rng.*int"):
        add_defect(image, "blob", 0)


def test_every_texture_loads_offline(np_rng: np.random.Generator) -> None:
    for name in TEXTURES:
        texture = synthetic._load_texture(name)
        assert texture.dtype == np.uint8 and texture.ndim == 2 and min(texture.shape) >= 256
        image = synthetic.normal_image(texture, (1.0, 1.0, 1.0), 50, np_rng)
        assert image.shape == (50, 50, 3) and image.dtype == np.uint8 and image.std() > 5


def _contents(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_dataset_is_deterministic(tmp_path: Path) -> None:
    first = make_synthetic_dataset(tmp_path / "a", seed=3, **SMALL)
    second = make_synthetic_dataset(tmp_path / "b", seed=3, **SMALL)
    other = make_synthetic_dataset(tmp_path / "c", seed=4, **SMALL)
    assert first == tmp_path / "a"
    contents = _contents(first)
    assert contents == _contents(second)
    assert contents.keys() == _contents(other).keys()
    assert contents["train/good/000.png"] != _contents(other)["train/good/000.png"]
    # Each image has its own generator: more test images leave the training images as they were.
    more = make_synthetic_dataset(tmp_path / "d", seed=3, **{**SMALL, "n_test_good": 3})
    assert _contents(more)["train/good/002.png"] == contents["train/good/002.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "d"]  # no staging left


def test_dataset_reads_as_mvtec(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "grass", seed=1, **SMALL)
    train, test = MVTecDataset(root, "train"), MVTecDataset(root, "test")
    assert len(train) == SMALL["n_train"]
    assert len(test) == SMALL["n_test_good"] + len(DEFECT_KINDS) * SMALL["n_test_per_defect"]
    assert test.defect_types == sorted(DEFECT_KINDS)
    assert test.labels.count(0) == SMALL["n_test_good"]
    for item in test:
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (64, 64) and item["has_mask"]
        assert item["mask"].any() == (item["label"] == 1)
    settings = json.loads((root / "synthetic.json").read_text())
    assert settings["seed"] == 1 and settings["texture"] == "grass"


def test_existing_root(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "set", **SMALL)
    stamp = (root / "train" / "good" / "000.png").stat().st_mtime_ns
    assert make_synthetic_dataset(root, **SMALL) == root  # same settings: reused as is
    assert (root / "train" / "good" / "000.png").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="set.*overwrite=True"):
        make_synthetic_dataset(root, seed=9, **SMALL)
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="mine"):
        make_synthetic_dataset(tmp_path / "mine", **SMALL)
    make_synthetic_dataset(root, seed=9, overwrite=True, **SMALL)
    assert json.loads((root / "synthetic.json").read_text())["seed"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "set"]


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_save(array: np.ndarray, path: Path) -> None:
        calls.append(path)
        if len(calls) == 4:
            raise OSError("disk full")
        original_save(array, path)

    original_save = synthetic._save_png
    monkeypatch.setattr(synthetic, "_save_png", failing_save)
    with pytest.raises(OSError, match="disk full"):
        make_synthetic_dataset(tmp_path / "set", **SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argument", "value", "error"),
    [
        ("texture", "marble", ValueError),
        ("size", 16, ValueError),
        ("n_train", 0, ValueError),
        ("n_test_good", 0, ValueError),
        ("n_test_per_defect", 0, ValueError),
        ("seed", -1, ValueError),
        ("size", 64.0, TypeError),
        ("n_train", True, TypeError),
    ],
)
def test_make_rejects_bad_arguments(tmp_path: Path, argument: str, value, error) -> None:
    with pytest.raises(error, match=argument):
        make_synthetic_dataset(tmp_path / "set", **{**SMALL, argument: value})
    assert not (tmp_path / "set").exists()

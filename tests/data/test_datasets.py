"""MVTecDataset, FolderDataset and open_dataset on small trees written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastad.data import FolderDataset, MVTecDataset, Sample, open_dataset

H, W = 12, 17


def _write_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (H, W)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def _write_mask(path: Path, rng: np.random.Generator, size: tuple[int, int] = (H, W)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = rng.integers(0, 256, size, dtype=np.uint8)
    Image.fromarray(values).save(path)
    return values >= 128


def _as_float(rgb: np.ndarray) -> np.ndarray:
    return (rgb.astype(np.float32) / np.float32(255)).transpose(2, 0, 1)


@pytest.fixture
def mvtec_tree(tmp_path: Path, np_rng: np.random.Generator) -> tuple[Path, dict, dict]:
    """A category with mixed extensions, stray files, and two defect types.

    Returns (root, pixels by image file name relative to root, masks by image file name).
    """
    root = tmp_path / "bottle"
    pixels: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    for name in (
        "train/good/002.png",
        "train/good/000.BMP",
        "train/good/001.Png",
        "test/good/000.png",
        "test/good/001.tiff",
        "test/crack/001.png",
        "test/crack/000.png",
        "test/hole/000.png",
    ):
        pixels[name] = _write_image(root / name, np_rng)
    for name in ("test/crack/000.png", "test/crack/001.png", "test/hole/000.png"):
        defect, stem = name.split("/")[1], Path(name).stem
        masks[name] = _write_mask(root / "ground_truth" / defect / f"{stem}_mask.png", np_rng)
    # Files a loader must ignore: not images, hidden resource forks, nested folders.
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    (root / "train" / "good" / "._000.png").write_bytes(b"\x00\x05\x16\x07")
    (root / "test" / "good" / "nested").mkdir()
    _write_image(root / "test" / "good" / "nested" / "deep.png", np_rng)
    (root / "license.txt").write_text("x")
    return root, pixels, masks


def test_mvtec_train(mvtec_tree) -> None:
    root, pixels, _ = mvtec_tree
    dataset = MVTecDataset(root, split="train")
    assert [s.path.name for s in dataset.samples] == ["000.BMP", "001.Png", "002.png"]  # sorted, any case
    assert all(isinstance(s, Sample) for s in dataset.samples)
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in dataset.samples)
    assert dataset.defect_types == []
    assert len(dataset) == 3
    for item, name in zip(dataset, ["train/good/000.BMP", "train/good/001.Png", "train/good/002.png"], strict=True):
        assert set(item) == {"image", "mask", "has_mask", "label", "defect", "path"}
        np.testing.assert_array_equal(item["image"].numpy(), _as_float(pixels[name]))
        assert item["image"].dtype == torch.float32
        assert item["mask"].dtype == torch.bool and item["mask"].shape == (H, W) and not item["mask"].any()
        assert item["has_mask"] is True and item["label"] == 0 and item["defect"] == "good"
        assert item["path"] == str(root / name)


def test_mvtec_test_labels_masks_order(mvtec_tree) -> None:
    root, pixels, masks = mvtec_tree
    dataset = MVTecDataset(str(root), split="test")
    names = ["test/crack/000.png", "test/crack/001.png", "test/good/000.png", "test/good/001.tiff", "test/hole/000.png"]
    assert [str(s.path.relative_to(root)) for s in dataset.samples] == names
    assert [s.label for s in dataset.samples] == [1, 1, 0, 0, 1]
    assert dataset.labels == [1, 1, 0, 0, 1]
    assert dataset.defect_types == ["crack", "hole"]
    assert dataset.samples[0].mask_path == root / "ground_truth" / "crack" / "000_mask.png"
    for index, name in enumerate(names):
        item = dataset[index]
        np.testing.assert_array_equal(item["image"].numpy(), _as_float(pixels[name]))
        expected_mask = masks.get(name, np.zeros((H, W), dtype=bool))
        np.testing.assert_array_equal(item["mask"].numpy(), expected_mask)
        assert item["has_mask"] is True
        assert item["defect"] == name.split("/")[1]
        assert item["label"] == (0 if item["defect"] == "good" else 1)


def test_mvtec_missing_mask_names_expected_path(mvtec_tree) -> None:
    root, _, _ = mvtec_tree
    (root / "ground_truth" / "hole" / "000_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"ground_truth/hole/000_mask\.png"):
        MVTecDataset(root, split="test")
    MVTecDataset(root, split="train")  # the train split needs no masks


def test_mvtec_mask_of_wrong_size(mvtec_tree, np_rng: np.random.Generator) -> None:
    root, _, _ = mvtec_tree
    _write_mask(root / "ground_truth" / "hole" / "000_mask.png", np_rng, size=(H + 1, W))
    dataset = MVTecDataset(root, split="test")
    with pytest.raises(ValueError, match=r"000_mask\.png.*test/hole/000\.png"):
        dataset[4]


@pytest.mark.parametrize(
    ("remove", "split", "message"),
    [("train", "train", r"missing folder .*train/good"), ("test", "test", r"missing folder .*test")],
)
def test_mvtec_bad_layout(mvtec_tree, remove: str, split: str, message: str) -> None:
    import shutil

    root, _, _ = mvtec_tree
    shutil.rmtree(root / remove)
    with pytest.raises(ValueError, match=message):
        MVTecDataset(root, split=split)


def test_mvtec_empty_train_folder(tmp_path: Path) -> None:
    (tmp_path / "train" / "good").mkdir(parents=True)
    (tmp_path / "train" / "good" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images.*train/good"):
        MVTecDataset(tmp_path, split="train")


def test_mvtec_bad_arguments(mvtec_tree, tmp_path: Path) -> None:
    root, _, _ = mvtec_tree
    with pytest.raises(ValueError, match="split.*'val'"):
        MVTecDataset(root, split="val")
    with pytest.raises(FileNotFoundError, match="no_such_category"):
        MVTecDataset(tmp_path / "no_such_category")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="a_file"):
        MVTecDataset(tmp_path / "a_file")
    with pytest.raises(TypeError, match="transform"):
        MVTecDataset(root, transform="resize")


def test_transform_sees_and_returns_the_item(mvtec_tree) -> None:
    root, _, _ = mvtec_tree
    seen = []

    def flip(item: dict) -> dict:
        seen.append(item["path"])
        return {**item, "image": item["image"].flip(-1), "mask": item["mask"].flip(-1)}

    plain, flipped = MVTecDataset(root, "test")[0], MVTecDataset(root, "test", transform=flip)[0]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["mask"], plain["mask"].flip(-1))
    assert seen == [plain["path"]]


def test_default_collate(mvtec_tree) -> None:
    root, _, _ = mvtec_tree
    batch = next(iter(DataLoader(MVTecDataset(root, "test"), batch_size=5)))
    assert batch["image"].shape == (5, 3, H, W) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (5, H, W) and batch["mask"].dtype == torch.bool
    assert batch["label"].tolist() == [1, 1, 0, 0, 1] and batch["label"].dtype == torch.int64
    assert batch["has_mask"].dtype == torch.bool and batch["has_mask"].all()
    assert batch["defect"] == ["crack", "crack", "good", "good", "hole"]
    assert all(isinstance(p, str) for p in batch["path"])


# ----------------------------------------------------------------------------- folder layout


def test_folder_with_good_and_defects(tmp_path: Path, np_rng: np.random.Generator) -> None:
    pixels = {
        name: _write_image(tmp_path / name, np_rng)
        for name in ("good/b.png", "good/a.jpg", "scratch/x.png", "dent/y.png", "dent/z.bmp")
    }
    train = FolderDataset(tmp_path, split="train")
    assert [str(s.path.relative_to(tmp_path)) for s in train.samples] == ["good/a.jpg", "good/b.png"]
    assert train.labels == [0, 0]
    test = FolderDataset(tmp_path, split="test")
    assert [str(s.path.relative_to(tmp_path)) for s in test.samples] == [
        "good/a.jpg",
        "good/b.png",
        "dent/y.png",
        "dent/z.bmp",
        "scratch/x.png",
    ]
    assert test.labels == [0, 0, 1, 1, 1]
    assert test.defect_types == ["dent", "scratch"]
    batch = next(iter(DataLoader(test, batch_size=len(test))))
    assert batch["has_mask"].tolist() == [True, True, False, False, False]  # no masks for defects
    assert not batch["mask"].any()
    np.testing.assert_array_equal(test[2]["image"].numpy(), _as_float(pixels["dent/y.png"]))


def test_folder_flat(tmp_path: Path, np_rng: np.random.Generator) -> None:
    for name in ("2.png", "1.png", "10.png"):
        _write_image(tmp_path / name, np_rng)
    (tmp_path / "index.csv").write_text("x")
    for split in ("train", "test"):
        dataset = FolderDataset(tmp_path, split=split)
        assert [s.path.name for s in dataset.samples] == ["1.png", "10.png", "2.png"]
        assert dataset.labels == [0, 0, 0] and dataset.defect_types == []
        assert dataset[0]["has_mask"] is True


def test_folder_errors(tmp_path: Path, np_rng: np.random.Generator) -> None:
    _write_image(tmp_path / "cats" / "a.png", np_rng)
    _write_image(tmp_path / "dogs" / "b.png", np_rng)
    with pytest.raises(ValueError, match=r"cats, dogs.*no 'good'"):
        FolderDataset(tmp_path)
    (tmp_path / "good").mkdir()
    with pytest.raises(ValueError, match=r"no normal images.*good"):
        FolderDataset(tmp_path)


# ----------------------------------------------------------------------------- open_dataset


def test_open_dataset_picks_the_layout(mvtec_tree, tmp_path: Path, np_rng: np.random.Generator) -> None:
    root, _, _ = mvtec_tree
    assert isinstance(open_dataset(root, "test"), MVTecDataset)
    assert len(open_dataset(root, "test")) == 5
    flat = tmp_path / "flat"
    _write_image(flat / "good" / "0.png", np_rng)
    _write_image(flat / "test" / "0.png", np_rng)  # a defect folder named "test", but no train/
    dataset = open_dataset(flat, "test")
    assert isinstance(dataset, FolderDataset) and dataset.defect_types == ["test"]


def test_open_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing_root"):
        open_dataset(tmp_path / "missing_root", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*is empty"):
        open_dataset(tmp_path / "empty", "train")
    with pytest.raises(ValueError, match="split"):
        open_dataset(tmp_path / "empty", "validation")

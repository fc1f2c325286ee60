"""MVTecDataset on the real magnetic-tile data (grey JPEGs of varying sizes, 0/255 masks with
faint edge pixels), when ../shared/data/magnetic_tile is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fastad.data import IMAGE_EXTENSIONS, MVTecDataset, ResizeCrop

ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "magnetic_tile"

pytestmark = pytest.mark.skipif(
    not ROOT.is_dir(), reason=f"magnetic-tile data not found at {ROOT} (see ../shared/data/README.md)"
)


def _count(folder: Path) -> int:
    """Image files in ``folder``, counted without fastad."""
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def test_counts_and_labels() -> None:
    train, test = MVTecDataset(ROOT, "train"), MVTecDataset(ROOT, "test")
    defects = sorted(p.name for p in (ROOT / "test").iterdir() if p.is_dir() and p.name != "good")
    assert len(train) == _count(ROOT / "train" / "good") > 0
    assert test.defect_types == defects == ["blowhole", "break"]
    for defect in defects + ["good"]:
        assert sum(s.defect == defect for s in test.samples) == _count(ROOT / "test" / defect) > 0
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in test.samples if s.label == 1)


def test_items_are_rgb_floats_with_bool_masks(np_rng: np.random.Generator) -> None:
    test = MVTecDataset(ROOT, "test")
    by_defect: dict[str, list[int]] = {}
    for index, sample in enumerate(test.samples):
        by_defect.setdefault(sample.defect, []).append(index)
    shapes = set()
    for defect, indices in by_defect.items():
        for index in np_rng.choice(indices, size=3, replace=False):
            item = test[int(index)]
            image, mask = item["image"], item["mask"]
            assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
            assert 0.0 <= image.min() and image.max() <= 1.0
            assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grey source
            assert mask.dtype == torch.bool and mask.shape == image.shape[1:]
            assert item["has_mask"] and item["defect"] == defect
            # Defect masks mark some, not all, pixels; the faint edge values stay outside.
            assert (0 < mask.float().mean() < 0.9) if defect != "good" else not mask.any()
            shapes.add(tuple(image.shape))
    assert len(shapes) > 1  # the tiles really are of varying sizes


def test_batches_after_resize() -> None:
    test = MVTecDataset(ROOT, "test", transform=ResizeCrop((96, 96)))
    batch = next(iter(DataLoader(test, batch_size=4)))
    assert batch["image"].shape == (4, 3, 96, 96) and batch["mask"].shape == (4, 96, 96)
    assert batch["mask"].dtype == torch.bool and batch["label"].tolist() == [1, 1, 1, 1]

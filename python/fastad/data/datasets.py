"""Map-style data sets over the two common on-disk layouts of anomaly-detection data.

MVTec AD layout (one category folder)::

    root/train/good/*.png                         normal training images
    root/test/good/*.png                          normal test images
    root/test/<defect>/<stem>.png                 anomalous test images, one folder per defect type
    root/ground_truth/<defect>/<stem>_mask.png    their pixel masks (0 = normal, 255 = defect)

Folder layout::

    root/good/*.png          normal images          (or, if root has no subfolders, root/*.png)
    root/<defect>/*.png      anomalous images, no masks

Every item is a dict that torch's default collate batches as long as the images share a size::

    image     float32 (3, H, W) in [0, 1], RGB
    mask      bool (H, W); all False for normal images and for anomalous images without a mask
    has_mask  bool: True when ``mask`` is the truth (normal images, or a mask file was read)
    label     int: 0 normal, 1 anomalous
    defect    str: "good" for normal images, else the defect folder's name
    path      str: the image file
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from .images import load_image, load_mask

__all__ = [
    "IMAGE_EXTENSIONS",
    "list_images",
    "GOOD",
    "Sample",
    "Item",
    "Transform",
    "ItemDataset",
    "AnomalyDataset",
    "MVTecDataset",
    "FolderDataset",
    "check_root",
    "check_split",
    "subfolders",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
GOOD = "good"  # the folder (and defect name) of normal images, as in MVTec AD

Item = dict[str, Any]
Transform = Callable[[Item], Item]

_SPLITS = ("train", "test")


class Sample(NamedTuple):
    """One image of a data set, before it is read."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect: str  # GOOD for normal images
    mask_path: Path | None  # None: no mask file (normal image, or anomalous without a mask)


def check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def check_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data set root not found: {root}")
    if not root.is_dir():
        raise ValueError(f"data set root must be a folder, got a file: {root}")
    return root


def _is_hidden(path: Path) -> bool:
    # Dot files include macOS "._name.png" resource forks, which carry an image extension.
    return path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by extension, any case), sorted by name; no recursion."""
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and not _is_hidden(entry) and entry.suffix.lower() in IMAGE_EXTENSIONS
    )


def subfolders(folder: Path) -> list[Path]:
    return sorted(entry for entry in folder.iterdir() if entry.is_dir() and not _is_hidden(entry))


def _check_transform(transform: object) -> Transform | None:
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be a callable on the item dict or None, got {type(transform).__name__}")
    return transform


class ItemDataset(Dataset):
    """What every fastad data set shares: a ``root``, a ``split`` and a ``transform`` applied to
    each item dict, which :meth:`with_transform` swaps (methods apply their own this way)."""

    def __init__(self, root: Path, split: str, transform: Transform | None) -> None:
        self.root = root
        self.split = split
        self.transform = _check_transform(transform)

    def with_transform(self, transform: Transform | None) -> ItemDataset:
        """The same items with another transform (a shallow copy; this data set is unchanged)."""
        other = copy.copy(self)
        other.transform = _check_transform(transform)
        return other


class AnomalyDataset(ItemDataset):
    """Base of the image data sets: reads ``samples`` into item dicts (see the module docstring).

    Subclasses fill ``self.samples`` (a list of :class:`Sample`) in their constructor.
    """

    samples: list[Sample]

    @property
    def defect_types(self) -> list[str]:
        """The defect names among this split's samples, sorted, without "good"."""
        return sorted({sample.defect for sample in self.samples if sample.label == 1})

    @property
    def labels(self) -> list[int]:
        """0/1 label of every sample, in order, without reading any image."""
        return [sample.label for sample in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        sample = self.samples[index]
        image = load_image(sample.path)
        height, width = image.shape[1:]
        if sample.mask_path is None:
            mask = torch.zeros(height, width, dtype=torch.bool)
            # A normal image's all-False mask is the truth; an anomalous one without a mask file
            # has an unknown mask.
            has_mask = sample.label == 0
        else:
            mask = load_mask(sample.mask_path)
            if tuple(mask.shape) != (height, width):
                raise ValueError(
                    f"mask {sample.mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                    f"{sample.path} is {width}x{height}"
                )
            has_mask = True
        item: Item = {
            "image": image,
            "mask": mask,
            "has_mask": has_mask,
            "label": sample.label,
            "defect": sample.defect,
            "path": str(sample.path),
        }
        return self.transform(item) if self.transform is not None else item

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"{len(self)} images, defects={self.defect_types})"
        )


class MVTecDataset(AnomalyDataset):
    """One category in the MVTec AD layout (see the module docstring).

    ``split="train"`` reads ``train/good``; ``split="test"`` reads every folder of ``test``,
    "good" as normal (label 0) and each other folder as a defect type (label 1) whose masks are
    ``ground_truth/<defect>/<stem>_mask.png``. Samples are sorted by defect name, then file name.

    Raises FileNotFoundError for a missing root or a missing mask file (naming the path it
    expected); ValueError when the root lacks the layout (saying which folder is missing or empty).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Transform | None = None) -> None:
        super().__init__(check_root(root), check_split(split), transform)
        self.samples = self._train_samples() if split == "train" else self._test_samples()

    def _train_samples(self) -> list[Sample]:
        good = self.root / "train" / GOOD
        if not good.is_dir():
            raise ValueError(f"{self.root} is not an MVTec-layout category: missing folder {good}")
        paths = list_images(good)
        if not paths:
            raise ValueError(f"{self.root}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {good}")
        return [Sample(path, 0, GOOD, None) for path in paths]

    def _test_samples(self) -> list[Sample]:
        test = self.root / "test"
        if not test.is_dir():
            raise ValueError(f"{self.root} is not an MVTec-layout category: missing folder {test}")
        samples: list[Sample] = []
        for folder in subfolders(test):
            defect = folder.name
            for path in list_images(folder):
                if defect == GOOD:
                    samples.append(Sample(path, 0, GOOD, None))
                    continue
                mask_path = self.root / "ground_truth" / defect / f"{path.stem}_mask.png"
                if not mask_path.is_file():
                    raise FileNotFoundError(f"mask not found for test image {path}: expected {mask_path}")
                samples.append(Sample(path, 1, defect, mask_path))
        if not samples:
            raise ValueError(f"{self.root}: no test images in any subfolder of {test}")
        return samples


class FolderDataset(AnomalyDataset):
    """Images in the plain folder layout (see the module docstring); anomalous ones have no masks.

    ``root/good`` holds the normal images, every other subfolder one defect type. When ``root``
    has no subfolders at all, its own images are the normal ones. ``split="train"`` gives the
    normal images; ``split="test"`` the normal images followed by the anomalous ones (sorted by
    defect name, then file name). The two splits share the normal images, so a test score on the
    normal images is a training score: hold some out yourself for an honest evaluation.

    Raises FileNotFoundError for a missing root; ValueError when it has subfolders but no "good"
    one, or no normal images.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Transform | None = None) -> None:
        super().__init__(check_root(root), check_split(split), transform)
        folders = subfolders(self.root)
        if not folders:
            good_folder, defect_folders = self.root, []
        elif (self.root / GOOD) in folders:
            good_folder = self.root / GOOD
            defect_folders = [folder for folder in folders if folder.name != GOOD]
        else:
            names = ", ".join(folder.name for folder in folders)
            raise ValueError(f"{self.root} has subfolders ({names}) but no '{GOOD}' folder of normal images")
        good = list_images(good_folder)
        if not good:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise ValueError(f"{self.root}: no normal images ({extensions}) in {good_folder}")
        self.samples = [Sample(path, 0, GOOD, None) for path in good]
        if split == "test":
            for folder in defect_folders:
                self.samples.extend(Sample(path, 1, folder.name, None) for path in list_images(folder))

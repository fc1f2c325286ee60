"""The test and training images of an MVTec-layout category, listed, subset and preprocessed as
fastad.data and fastad's ``ResizeCrop`` do, for the side of a peer comparison that cannot import
fastad (anomalib's environment).

Only the standard library is imported at module level: fastad's driver imports
:func:`evenly_spaced` from here so that both sides pick the same images by one rule, and the
anomalib side imports the rest; numpy, torch, PIL and torchvision are imported where used.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
GOOD = "good"
MASK_THRESHOLD = 128  # grey level at or above which a mask pixel is a defect (as fastad.data)

# (image, label 0/1, defect name, mask path or None)
Sample = tuple[Path, int, str, "Path | None"]


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, by extension (any case), no dot files, sorted."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def list_samples(root: Path, split: str) -> list[Sample]:
    """The samples of ``split`` ("train": the good training images; "test": sorted by defect
    folder, then by name, as fastad.data.MVTecDataset). Raises FileNotFoundError naming the
    missing folder or mask."""
    if split == "train":
        folder = root / "train" / GOOD
        if not folder.is_dir():
            raise FileNotFoundError(f"{root} is not an MVTec-layout category: missing folder {folder}")
        return [(p, 0, GOOD, None) for p in list_images(folder)]
    test = root / "test"
    if not test.is_dir():
        raise FileNotFoundError(f"{root} is not an MVTec-layout category: missing folder {test}")
    samples: list[Sample] = []
    for folder in sorted(p for p in test.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in list_images(folder):
            if folder.name == GOOD:
                samples.append((path, 0, GOOD, None))
                continue
            mask = root / "ground_truth" / folder.name / f"{path.stem}_mask.png"
            if not mask.is_file():
                raise FileNotFoundError(f"mask not found for test image {path}: expected {mask}")
            samples.append((path, 1, folder.name, mask))
    return samples


def evenly_spaced(items: list, limit: int | None) -> list:
    """``limit`` items spread evenly over the list (first and last included), or all of them.

    The driver applies the same rule to fastad's data sets, so both sides see the same images."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 2:
        return items[:limit]
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


class Preprocess:
    """Reads an image (float32 (3, S, S) in [0, 1]) and its mask (bool (S, S)), S = ``crop``:
    shorter side resized to ``resize`` (images bilinear + antialias, masks nearest-exact), then
    the centre ``crop`` x ``crop``."""

    def __init__(self, resize: int, crop: int) -> None:
        self.resize, self.crop = resize, crop

    def image(self, path: Path):
        import numpy as np
        import torch
        from PIL import Image, ImageOps
        from torchvision.transforms.v2 import functional as TF

        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
            array = np.asarray(rgb, dtype=np.uint8).copy()
        image = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
        low, high = float(image.min()), float(image.max())
        image = TF.resize(image, [self.resize], antialias=True).clamp_(low, high)
        return TF.center_crop(image, [self.crop]).contiguous()

    def mask(self, path: Path | None, like_image: Path):
        import numpy as np
        import torch
        from PIL import Image, ImageOps
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        if path is None:
            with Image.open(like_image) as im:
                width, height = ImageOps.exif_transpose(im).size
            mask = torch.zeros(1, height, width, dtype=torch.uint8)
        else:
            with Image.open(path) as im:
                grey = np.asarray(ImageOps.exif_transpose(im).convert("L"), dtype=np.uint8)
            mask = torch.from_numpy((grey >= MASK_THRESHOLD).astype(np.uint8))[None]
        mask = TF.resize(mask, [self.resize], interpolation=InterpolationMode.NEAREST_EXACT)
        return TF.center_crop(mask, [self.crop])[0].bool().contiguous()


def batches(paths: list[Path], prep: Preprocess, batch_size: int) -> Iterator[Any]:
    """Preprocessed images, float32 (B, 3, S, S) in [0, 1], ``batch_size`` at a time."""
    import torch

    for start in range(0, len(paths), batch_size):
        yield torch.stack([prep.image(p) for p in paths[start : start + batch_size]])

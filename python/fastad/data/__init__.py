"""Images in, tensors out: image and mask loading, the MVTec-layout and folder data sets,
template / inspected change pairs (``ChangePairs``), an aligned resize/crop, and a synthetic
defect data set that needs no download.

Items of every data set are dicts (``image`` float32 (3, H, W) in [0, 1], ``mask`` bool (H, W),
``has_mask``, ``label``, ``defect``, ``path``; see :mod:`fastad.data.datasets`). Importing this
package loads neither torchvision nor scikit-image.
"""

from __future__ import annotations

from .change_pairs import ChangePairs, is_change_pair_folder
from .datasets import (
    GOOD,
    IMAGE_EXTENSIONS,
    AnomalyDataset,
    FolderDataset,
    MVTecDataset,
    Sample,
    list_images,
)
from .images import MASK_THRESHOLD, load_image, load_mask
from .opening import open_dataset
from .synthetic import DEFECT_KINDS, TEXTURES, add_defect, make_synthetic_dataset
from .transforms import ResizeCrop

__all__ = [
    "GOOD",
    "IMAGE_EXTENSIONS",
    "MASK_THRESHOLD",
    "DEFECT_KINDS",
    "TEXTURES",
    "AnomalyDataset",
    "ChangePairs",
    "FolderDataset",
    "MVTecDataset",
    "Sample",
    "ResizeCrop",
    "add_defect",
    "is_change_pair_folder",
    "list_images",
    "load_image",
    "load_mask",
    "make_synthetic_dataset",
    "open_dataset",
]

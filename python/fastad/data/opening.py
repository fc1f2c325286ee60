"""Which data set a folder holds: :func:`open_dataset` picks the layout from what is there."""

from __future__ import annotations

import os

from .change_pairs import ChangePairs, is_change_pair_folder
from .datasets import (
    AnomalyDataset,
    FolderDataset,
    MVTecDataset,
    Transform,
    check_root,
    check_split,
    list_images,
    subfolders,
)

__all__ = ["open_dataset"]


def open_dataset(
    root: str | os.PathLike, split: str, transform: Transform | None = None
) -> AnomalyDataset | ChangePairs:
    """The data set at ``root``: :class:`MVTecDataset` when ``root/train`` and ``root/test`` are
    folders, :class:`ChangePairs` (test pairs only) when ``root`` has ``A/``, ``B/`` and
    ``label/``, else :class:`FolderDataset`.

    Raises FileNotFoundError for a missing root; ValueError for a file, or a folder holding
    neither images nor subfolders.
    """
    root = check_root(root)
    check_split(split)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return MVTecDataset(root, split, transform)
    if is_change_pair_folder(root):
        if split != "test":
            raise ValueError(f"{root} holds template / inspected test pairs (A/, B/, label/), nothing to {split} on")
        return ChangePairs(root, transform)
    if not subfolders(root) and not list_images(root):
        raise ValueError(
            f"data set root {root} is empty: expected train/ and test/ (MVTec layout), "
            f"good/ and defect folders, A/, B/ and label/ (change pairs), or images"
        )
    return FolderDataset(root, split, transform)

"""Template / inspected pairs with change masks, in the layout of the LEVIR-CD and DSIFN-CD
change-detection sets::

    root/A/<name>.png       before: the template
    root/B/<name>.png       after: the inspected image
    root/label/<name>.png   the change mask (0 = unchanged, 255 = changed)

A pair is the three files of one name. Items are the data sets' dicts (``fastad.data.datasets``)
with the inspected image as ``image`` and one more key, ``template``; ``label`` is 1 when the mask
marks a change, ``defect`` "change" or "good". A pair with its B image or its mask missing cannot
be scored against the truth: it is left out and named in :attr:`ChangePairs.skipped`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .datasets import GOOD, Item, ItemDataset, Transform, check_root, list_images
from .images import load_image, load_mask

__all__ = ["CHANGE", "ChangePairs", "is_change_pair_folder"]

CHANGE = "change"  # the defect name of a pair whose mask marks a change
_FOLDERS = ("A", "B", "label")


def is_change_pair_folder(root: str | os.PathLike) -> bool:
    """Whether ``root`` has the A/, B/ and label/ folders of the change-detection layout."""
    root = Path(root)
    return all((root / name).is_dir() for name in _FOLDERS)


class ChangePairs(ItemDataset):
    """The pairs under ``root`` (see the module docstring), sorted by name; ``transform`` is
    applied to each item as in the other data sets."""

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None) -> None:
        root = check_root(root)
        if not is_change_pair_folder(root):
            missing = [name for name in _FOLDERS if not (root / name).is_dir()]
            raise ValueError(f"{root} is not a change-detection folder: it has no {', '.join(missing)} folder(s)")
        super().__init__(root, "test", transform)
        self.pairs: list[tuple[Path, Path, Path]] = []
        self.skipped: dict[str, str] = {}
        for before in list_images(root / "A"):
            after, mask = root / "B" / before.name, root / "label" / before.name
            if not after.is_file():
                self.skipped[before.name] = f"no B image ({after})"
            elif not mask.is_file():
                self.skipped[before.name] = f"no change mask ({mask})"
            else:
                self.pairs.append((before, after, mask))
        if not self.pairs:
            raise ValueError(f"{root} holds no complete pair (A, B and label files of one name)")
        self._labels: list[int] | None = None

    @property
    def labels(self) -> list[int]:
        """0/1 label of every pair, in order (read from the masks once)."""
        if self._labels is None:
            self._labels = [int(bool(load_mask(mask).any())) for _, _, mask in self.pairs]
        return self._labels

    @property
    def defect_types(self) -> list[str]:
        return [CHANGE] if any(self.labels) else []

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Item:
        before, after, mask_path = self.pairs[index]
        template, image, mask = load_image(before), load_image(after), load_mask(mask_path)
        if template.shape != image.shape or tuple(image.shape[1:]) != tuple(mask.shape):
            raise ValueError(
                f"pair {before.name} under {self.root}: the sizes differ (A {tuple(template.shape[1:])}, "
                f"B {tuple(image.shape[1:])}, label {tuple(mask.shape)})"
            )
        changed = bool(mask.any())
        item: dict[str, Any] = {
            "image": image,
            "template": template,
            "mask": mask,
            "has_mask": True,
            "label": int(changed),
            "defect": CHANGE if changed else GOOD,
            "path": str(after),
        }
        return self.transform(item) if self.transform is not None else item

    def __repr__(self) -> str:
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        return f"ChangePairs(root={str(self.root)!r}, {len(self)} pairs{skipped})"

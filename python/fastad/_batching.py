"""Reading images out of whatever the user hands over, and batching them by size.

One place for the rules every consumer of images follows (method fit and predict, the feature
extractor, evaluation): what an element of a data set or DataLoader looks like, and how single
images of possibly different sizes become batches (consecutive images of one size, at most
``batch_size`` of them; a new size starts a new batch, so nothing is resized behind the user's
back).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


def is_map_dataset(data: Any) -> bool:
    """A map-style data set (torch Dataset, ``fastad.data``): indexable with a length, and not a
    tensor or a plain container of images."""
    return (
        hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not isinstance(data, (torch.Tensor, list, tuple, dict))
    )


def images_of(element: Any) -> torch.Tensor:
    """The image tensor of one element: a tensor, a dict holding ``"image"`` (a ``fastad.data``
    item or batch) or a tuple/list whose first entry is the images (a DataLoader over a
    ``TensorDataset``). Shape (3, H, W) or (B, 3, H, W); checking the values is the caller's job."""
    if isinstance(element, dict):
        if "image" not in element:
            raise ValueError(f"a data item dict must hold 'image', got keys {sorted(element)}")
        element = element["image"]
    elif isinstance(element, (tuple, list)) and element and isinstance(element[0], torch.Tensor):
        element = element[0]
    if not isinstance(element, torch.Tensor) or element.dim() not in (3, 4):
        what = (
            f"a tensor of shape {tuple(element.shape)}" if isinstance(element, torch.Tensor) else type(element).__name__
        )
        raise TypeError(
            "each element must be images (B, 3, H, W), one image (3, H, W), "
            f"a dict with 'image' or a tuple (images, ...); got {what}"
        )
    return element


def labels_of(element: Any) -> torch.Tensor | None:
    """The 0/1 labels of an element when it carries them (``fastad.data`` items and batches)."""
    if isinstance(element, dict) and element.get("label") is not None:
        return torch.as_tensor(element["label"]).reshape(-1)
    return None


def describe(element: Any) -> str:
    """How to name an element in an error: its file when it has one."""
    if isinstance(element, dict) and element.get("path"):
        return str(element["path"])
    return "an element"


def iterate(data: Any) -> Iterator[Any]:
    """The elements of ``data``: a map-style data set in index order, or any iterable."""
    if is_map_dataset(data):  # by index: a Dataset's __iter__ may be missing or mean something else
        return (data[i] for i in range(len(data)))
    if not isinstance(data, Iterable) or isinstance(data, (torch.Tensor, dict)):
        raise TypeError(f"expected a data set, a DataLoader or an iterable of image batches, got {type(data).__name__}")
    return iter(data)


def group_by_size(elements: Iterable[Any], batch_size: int) -> Iterator[list[Any]]:
    """Groups elements into lists that stack into one batch each.

    A batched element (B, 3, H, W) is a group of its own, passed through; single images (3, H, W)
    are gathered while they share one size, up to ``batch_size`` of them.
    """
    pending: list[Any] = []
    shape = None
    for element in elements:
        images = images_of(element)
        if images.dim() == 4:
            if pending:
                yield pending
                pending = []
            yield [element]
            continue
        if pending and (images.shape != shape or len(pending) == batch_size):
            yield pending
            pending = []
        if not pending:
            shape = images.shape
        pending.append(element)
    if pending:
        yield pending


def stack_images(group: list[Any]) -> torch.Tensor:
    """One (B, 3, H, W) tensor from a group made by :func:`group_by_size`."""
    first = images_of(group[0])
    if first.dim() == 4:
        return first
    return torch.stack([images_of(element) for element in group])


def stack_labels(group: list[Any]) -> torch.Tensor | None:
    """The labels of a group, or None when its elements carry none."""
    labels = [labels_of(element) for element in group]
    if any(label is None for label in labels):
        return None
    return torch.cat(labels)

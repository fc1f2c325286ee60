"""What every method accepts as images: tensors, fastad data sets and DataLoaders, streamed as
checked batches (B, 3, H, W) of consecutive images of one size."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .._batching import describe, group_by_size, is_map_dataset, iterate, stack_images, stack_labels
from ..checks import check_image_batch


def check_images(images: Any, what: str = "images") -> torch.Tensor:
    """A batch (B, 3, H, W), or one image (3, H, W) made a batch of one, checked as every image
    entering fastad is (``fastad.checks``)."""
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        images = images.unsqueeze(0)
    return check_image_batch(images, what)


def _name_of(group: list[Any]) -> str:
    """How the checks name a batch in errors: the file of a single image when it has one."""
    single = len(group) == 1 and describe(group[0]) != "an element"
    return f"image {describe(group[0])}" if single else "images"


def _check_normal(group: list[Any]) -> None:
    labels = stack_labels(group)
    if labels is None or not bool((labels != 0).any()):
        return
    first = int((labels != 0).nonzero()[0])
    where = describe(group[first]) if len(group) == labels.numel() else "a batch"
    raise ValueError(f"fit expects normal images only, but {where} holds an image labelled anomalous")


def iter_image_batches(data: Any, batch_size: int, *, normal_only: bool = False) -> Iterator[torch.Tensor]:
    """Streams ``data`` as checked image batches (B, 3, H, W).

    ``data`` is an image tensor (N, 3, H, W) or (3, H, W), a map-style data set whose items are
    dicts with ``image`` (fastad.data) or tensors, or any iterable of batches (a DataLoader): a
    tensor, a dict with ``image`` or a tuple whose first element is the images. Single images are
    batched while consecutive ones share a size (``fastad._batching``). With ``normal_only`` an
    item labelled anomalous is an error (fitting must see normal images only).
    """
    if isinstance(data, dict):  # one item or one batch, e.g. test_set[0]
        data = [data]
    if isinstance(data, torch.Tensor):
        images = check_images(data)
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    if is_map_dataset(data) and len(data) == 0:
        raise ValueError("the data set is empty")
    seen = 0
    for group in group_by_size(iterate(data), batch_size):
        if normal_only:
            _check_normal(group)
        seen += 1
        yield check_images(stack_images(group), _name_of(group))
    if seen == 0:
        raise ValueError("the data yielded no images")


def same_size_runs(images: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Consecutive images of one size, stacked (held-back images may come in several sizes)."""
    for group in group_by_size(images, len(images)):
        yield stack_images(group)

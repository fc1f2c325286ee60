"""Training pairs for the Siamese network, with synthetic defects.

Training rule (CIFAR-10, as in the paper): two random images; each independently receives, with
probability 1/2, a filled blue rectangle covering 1-99 % of the image with aspect ratio
(width / height) 0.5-1.5 at a random position (the rectangle rule: :mod:`.rectangles`). The pair
is *dissimilar* when exactly one of the two has a rectangle, *similar* otherwise: the network
must learn to notice a difference between template and inspected image, not the presence of blue.
MNIST pairs are similar when the digits are equal.

The paper's test scenes (mosaics, a large aerial template with scattered rectangles) are
experiment code: ``benchmarks/siamese_paper/scenes.py``.

Reproducibility: every random choice of a pair data set is a pure function of (seed, epoch, item
index), computed with a counter-based generator (SplitMix64 over those numbers), so items can be
drawn in any order, in any batch, in any worker, and :meth:`RectanglePairs.batch` equals stacking
``__getitem__`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..checks import check_fraction, check_int
from .rectangles import (
    AREA,
    ASPECT,
    BLUE,
    MAX_DRAWS,
    Box,
    Color,
    check_color,
    check_range,
    check_uint8_images,
    fill_values,
    paint_rectangle,
    require_sampleable,
    rounded_sizes,
)

__all__ = ["DigitPairs", "RectanglePairs"]


# ---------------------------------------------------------------------------------------------
# counter-based random numbers: a pure function of (seed, epoch, item, stream)

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_ITEMS = 0  # key domains: the pairs themselves, and the epoch permutations (1 + block)


def _mix(x: int) -> int:
    """SplitMix64's output function on a Python int (one step of its state advance included)."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    """:func:`_mix` on uint64 arrays (array arithmetic wraps around silently, as it must here)."""
    z = x + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _keys(seed: int, epoch: int, domain: int, indices: np.ndarray) -> np.ndarray:
    """uint64 keys, one per index, for (seed, epoch, domain)."""
    base = _mix(_mix(_mix(seed) ^ domain) ^ epoch)
    return _mix_array(np.uint64(base) ^ indices.astype(np.uint64))


def _uniform(keys: np.ndarray, stream: int) -> np.ndarray:
    """float64 uniforms in [0, 1), one per key: the ``stream``-th output of SplitMix64 started at
    the key, so streams of one key are independent draws."""
    z = _mix_array(keys + np.uint64(((stream + 1) * _GOLDEN) & _MASK64))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _below(u: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """floor(u * n) as int64, in [0, n - 1]: a uniform integer from a uniform float."""
    return np.minimum(np.floor(u * n).astype(np.int64), np.asarray(n, dtype=np.int64) - 1)


def _check_indices(indices: object, length: int) -> np.ndarray:
    """int64 array of item indices in [0, length); IndexError / TypeError otherwise."""
    array = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise TypeError(f"indices must be a 1-D sequence of ints, got {array.dtype} array of shape {array.shape}")
    if int(array.min()) < 0 or int(array.max()) >= length:
        raise IndexError(f"indices must lie in [0, {length}), got values in [{int(array.min())}, {int(array.max())}]")
    return array.astype(np.int64)


def _check_index(index: object, length: int) -> int:
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    if not 0 <= int(index) < length:
        raise IndexError(f"index {index} out of range for {length} pairs")
    return int(index)


class _EpochPairs(Dataset):
    """What both pair sets share: the seed, the epoch and the keys of its items."""

    def __init__(self, n_images: int, n_pairs: int, seed: int):
        self.n_pairs = check_int(n_pairs, "n_pairs", meaning="the number of pairs per epoch")
        self.seed = check_int(seed, "seed", minimum=0, maximum=2**64 - 1)
        self._n_images = n_images
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draws of epoch ``epoch`` from now on (the same epoch always gives the same pairs).
        A DataLoader's persistent workers hold copies: call it before they are started."""
        self.epoch = check_int(epoch, "epoch", minimum=0)

    def __len__(self) -> int:
        return self.n_pairs

    def _item_keys(self, indices: np.ndarray) -> np.ndarray:
        return _keys(self.seed, self.epoch, _ITEMS, indices)


def _float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] (the one conversion every item and batch uses)."""
    return images.to(torch.float32).div_(255.0)


# ---------------------------------------------------------------------------------------------
# CIFAR-style pairs: random images with random blue rectangles


class RectanglePairs(_EpochPairs):
    """Pairs of images where each image independently has, with probability ``p_defect``, a
    filled rectangle; a pair is similar (1.0) when both or neither have one, else dissimilar (0.0).

    ``images``: uint8 (N, C, H, W), C = 1 or 3, kept by reference (on any device; items are made
    there). ``n_pairs``: pairs per epoch, N by default. Item ``i`` of epoch ``e`` is a pure
    function of (``seed``, ``e``, ``i``): its first image is the ``i``-th of a permutation of the
    images drawn for the epoch (so with ``n_pairs == N`` every image is first of exactly one pair
    per epoch; with more pairs, further permutations follow), its second image is uniformly
    random, and each receives a rectangle of :func:`sample_rectangle`'s distribution (``area``,
    ``aspect``) in ``color`` with probability ``p_defect``.

    Items: ``x1``, ``x2`` float32 (C, H, W) in [0, 1]; ``similar`` float32 scalar 1.0 / 0.0;
    ``mask1``, ``mask2`` bool (H, W), True on the rectangle; ``index1``, ``index2`` int64
    scalars, the images used. :meth:`batch` returns the same, stacked, built in one go.
    """

    def __init__(
        self,
        images: torch.Tensor,
        n_pairs: int | None = None,
        *,
        seed: int = 0,
        p_defect: float = 0.5,
        area: tuple[float, float] = AREA,
        aspect: tuple[float, float] = ASPECT,
        color: Color = BLUE,
    ):
        self.images = check_uint8_images(images)
        super().__init__(images.shape[0], images.shape[0] if n_pairs is None else n_pairs, seed)
        self.p_defect = check_fraction(p_defect, "p_defect")
        self.area = check_range(area, "area", upper=1.0)
        self.aspect = check_range(aspect, "aspect", upper=None)
        self.color = check_color(color)
        self._height, self._width = int(images.shape[2]), int(images.shape[3])
        require_sampleable(self._height, self._width, self.area, self.aspect)
        self._permutations: dict[tuple[int, int], np.ndarray] = {}  # (epoch, block) -> permutation

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._permutations = {key: perm for key, perm in self._permutations.items() if key[0] == self.epoch}

    def _permutation(self, block: int) -> np.ndarray:
        """The permutation of the images for pairs ``block * N .. (block + 1) * N - 1`` of this epoch."""
        key = (self.epoch, block)
        if key not in self._permutations:
            scores = _uniform(_keys(self.seed, self.epoch, 1 + block, np.arange(self._n_images)), 0)
            self._permutations[key] = np.argsort(scores, kind="stable")
        return self._permutations[key]

    def _draw(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The random choices of items ``indices``: first and second image (B,), has-rectangle
        (B, 2) bool, boxes (B, 2, 4) int64 as (top, left, height, width), zero without rectangle."""
        n = self._n_images
        keys = self._item_keys(indices)
        first = np.empty(indices.shape[0], dtype=np.int64)
        blocks = indices // n
        for block in np.unique(blocks):
            chosen = blocks == block
            first[chosen] = self._permutation(int(block))[indices[chosen] % n]
        second = _below(_uniform(keys, 0), n)
        has = np.stack([_uniform(keys, 1) < self.p_defect, _uniform(keys, 2) < self.p_defect], axis=1)
        boxes = np.zeros((indices.shape[0], 2, 4), dtype=np.int64)
        for slot in range(2):
            rows = np.flatnonzero(has[:, slot])
            boxes[rows, slot] = self._boxes(keys[rows], slot)
        return {"first": first, "second": second, "has": has, "boxes": boxes}

    def _boxes(self, keys: np.ndarray, slot: int) -> np.ndarray:
        """(B, 4) boxes for image ``slot`` (0 or 1) of the items with ``keys``: the rejection rule
        of :func:`sample_rectangle`, round r reading streams 16 + 4 r + 2 slot (+ 1)."""
        height, width = self._height, self._width
        sizes = np.zeros((keys.shape[0], 2), dtype=np.int64)
        pending = np.arange(keys.shape[0])
        for round_ in range(MAX_DRAWS):
            if pending.size == 0:
                break
            stream = 16 + 4 * round_ + 2 * slot
            h, w, accepted = rounded_sizes(
                _uniform(keys[pending], stream),
                _uniform(keys[pending], stream + 1),
                height,
                width,
                self.area,
                self.aspect,
            )
            sizes[pending[accepted]] = np.stack([h[accepted], w[accepted]], axis=1)
            pending = pending[~accepted]
        if pending.size:  # unreachable in practice: see rectangles.MIN_ACCEPTANCE
            raise ValueError(
                f"no rectangle accepted in {MAX_DRAWS} draws for a {height}x{width} image "
                f"with area {self.area} and aspect {self.aspect}"
            )
        top = _below(_uniform(keys, 3 + 2 * slot), height - sizes[:, 0] + 1)
        left = _below(_uniform(keys, 4 + 2 * slot), width - sizes[:, 1] + 1)
        return np.stack([top, left, sizes[:, 0], sizes[:, 1]], axis=1)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = _check_index(index, len(self))
        draw = self._draw(np.array([index], dtype=np.int64))
        item: dict[str, torch.Tensor] = {}
        for slot, image_key in ((0, "first"), (1, "second")):
            image_index = int(draw[image_key][0])
            image = _float_images(self.images[image_index])
            if draw["has"][0, slot]:
                top, left, height, width = (int(v) for v in draw["boxes"][0, slot])
                image, mask = paint_rectangle(image, Box(top, left, height, width), self.color)
            else:
                mask = torch.zeros(self._height, self._width, dtype=torch.bool, device=image.device)
            item[f"x{slot + 1}"], item[f"mask{slot + 1}"] = image, mask
            item[f"index{slot + 1}"] = torch.tensor(image_index, dtype=torch.int64)
        item["similar"] = torch.tensor(float(draw["has"][0, 0] == draw["has"][0, 1]), dtype=torch.float32)
        return item

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Items ``indices`` stacked (x1, x2 (B, C, H, W); similar (B,); mask1, mask2 (B, H, W);
        index1, index2 (B,)), equal to stacking :meth:`__getitem__` but built in one pass."""
        indices = _check_indices(indices, len(self))
        draw = self._draw(indices)
        device = self.images.device
        fill = fill_values(self.color, self.images.shape[1], torch.float32, device)[None, :, None, None]
        rows = torch.arange(self._height, device=device)
        cols = torch.arange(self._width, device=device)
        out: dict[str, torch.Tensor] = {}
        for slot, image_key in ((0, "first"), (1, "second")):
            chosen = torch.from_numpy(draw[image_key])
            boxes = torch.from_numpy(draw["boxes"][:, slot]).to(device)
            top, left, height, width = boxes.unbind(1)
            in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])  # (B, H)
            in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])  # (B, W)
            has = torch.from_numpy(draw["has"][:, slot]).to(device)
            mask = in_rows[:, :, None] & in_cols[:, None, :] & has[:, None, None]
            images = _float_images(self.images[chosen.to(device)])
            out[f"x{slot + 1}"] = torch.where(mask[:, None], fill, images)
            out[f"mask{slot + 1}"] = mask
            out[f"index{slot + 1}"] = chosen
        out["similar"] = torch.from_numpy(draw["has"][:, 0] == draw["has"][:, 1]).to(torch.float32)
        return out


# ---------------------------------------------------------------------------------------------
# MNIST-style pairs: similar when the labels are equal


class DigitPairs(_EpochPairs):
    """Pairs of labelled images, similar (1.0) when their labels are equal.

    Each pair's first image is uniformly random. With ``similar_fraction`` None its partner is a
    uniformly random *other* image, whatever its label (the paper's pairs: with ten balanced classes
    about 10 % share a label). With a number, the partner is a uniformly random other image of the
    same label with that probability, else a uniformly random image of a different label (0.5:
    balanced pairs, which teach "same" as often as "different").
    Item ``i`` of epoch ``e`` is a pure function of (``seed``, ``e``, ``i``).

    ``images``: uint8 (N, C, H, W) (C = 1 for MNIST); ``labels``: int64 (N,), any values.
    Items: ``x1``, ``x2`` float32 (C, H, W) in [0, 1]; ``similar`` float32 scalar; ``label1``,
    ``label2``, ``index1``, ``index2`` int64 scalars. :meth:`batch` returns them stacked.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        n_pairs: int = 50_000,
        *,
        seed: int = 0,
        similar_fraction: float | None = None,
    ):
        self.images = check_uint8_images(images)
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            got = (
                f"{labels.dtype} tensor of shape {tuple(labels.shape)}"
                if isinstance(labels, torch.Tensor)
                else type(labels).__name__
            )
            raise TypeError(f"labels must be an int64 tensor of shape ({images.shape[0]},), got {got}")
        super().__init__(images.shape[0], n_pairs, seed)
        self.labels = labels
        self.similar_fraction = (
            None if similar_fraction is None else check_fraction(similar_fraction, "similar_fraction")
        )
        if self.similar_fraction is None and images.shape[0] < 2:
            raise ValueError("random pairs need at least two images")
        values, classes, counts = np.unique(labels.cpu().numpy(), return_inverse=True, return_counts=True)
        if self.similar_fraction is None:
            pass  # any two images make a pair; the labels only say whether it is similar
        elif self.similar_fraction > 0 and counts.min() < 2:
            lonely = ", ".join(str(v) for v in values[counts < 2])
            raise ValueError(
                f"label(s) {lonely} have a single image: similar pairs need two images of each label "
                "(or set similar_fraction=0)"
            )
        elif self.similar_fraction < 1 and values.shape[0] < 2:
            raise ValueError(
                f"all images have label {values[0]}: dissimilar pairs need two labels (or set similar_fraction=1)"
            )
        # Images grouped by label: a partner is a position in this order.
        self._order = np.argsort(classes, kind="stable")
        self._class = classes
        self._count = counts
        self._start = np.cumsum(counts) - counts
        self._rank = np.empty_like(self._order)
        self._rank[self._order] = np.arange(self._order.shape[0]) - np.repeat(self._start, counts)

    def _draw(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """First and second image (B,) and whether the pair is similar (B,) bool."""
        n = self._n_images
        keys = self._item_keys(indices)
        first = _below(_uniform(keys, 0), n)
        u = _uniform(keys, 2)
        if self.similar_fraction is None:  # any other image
            other = _below(u, n - 1)
            second = other + (other >= first)
            return {"first": first, "second": second, "similar": self._class[first] == self._class[second]}
        similar = _uniform(keys, 1) < self.similar_fraction
        cls = self._class[first]
        count, start = self._count[cls], self._start[cls]
        # Same label: one of the count - 1 others, skipping the first image's own position.
        same = _below(u, np.maximum(count - 1, 1))
        same_position = start + same + (same >= self._rank[first])
        # Other label: a position among the n - count images outside the first's label block.
        other = _below(u, np.maximum(n - count, 1))
        other_position = other + count * (other >= start)
        second = self._order[np.minimum(np.where(similar, same_position, other_position), n - 1)]
        return {"first": first, "second": second, "similar": similar}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = _check_index(index, len(self))
        draw = self._draw(np.array([index], dtype=np.int64))
        item: dict[str, torch.Tensor] = {}
        for slot, image_key in ((1, "first"), (2, "second")):
            image_index = int(draw[image_key][0])
            item[f"x{slot}"] = _float_images(self.images[image_index])
            item[f"label{slot}"] = self.labels[image_index].clone()
            item[f"index{slot}"] = torch.tensor(image_index, dtype=torch.int64)
        item["similar"] = torch.tensor(float(draw["similar"][0]), dtype=torch.float32)
        return item

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Items ``indices`` stacked (x1, x2 (B, C, H, W); similar (B,); label1, label2, index1,
        index2 (B,)), equal to stacking :meth:`__getitem__`."""
        indices = _check_indices(indices, len(self))
        draw = self._draw(indices)
        out: dict[str, torch.Tensor] = {}
        for slot, image_key in ((1, "first"), (2, "second")):
            chosen = torch.from_numpy(draw[image_key])
            out[f"x{slot}"] = _float_images(self.images[chosen.to(self.images.device)])
            out[f"label{slot}"] = self.labels[chosen.to(self.labels.device)]
            out[f"index{slot}"] = chosen
        out["similar"] = torch.from_numpy(draw["similar"]).to(torch.float32)
        return out

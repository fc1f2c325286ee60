"""Training and test pairs for the Siamese network, with synthetic defects.

Training rule (CIFAR-10, as in the paper): two random images; each independently receives, with
probability 1/2, a filled blue rectangle covering 1-99 % of the image with aspect ratio
(width / height) 0.5-1.5 at a random position. The pair is *dissimilar* when exactly one of the
two has a rectangle, *similar* otherwise: the network must learn to notice a difference between
template and inspected image, not the presence of blue. MNIST pairs are similar when the digits
are equal.

The paper's test scenes (mosaics, a large aerial template with scattered rectangles) are
experiment code: ``benchmarks/siamese_paper/scenes.py``.

Reproducibility: every random choice of a pair data set is a pure function of (seed, epoch, item
index), computed with a counter-based generator (SplitMix64 over those numbers), so items can be
drawn in any order, in any batch, in any worker, and :meth:`RectanglePairs.batch` equals stacking
``__getitem__`` exactly. The free functions take a ``torch.Generator``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np
import torch
from torch.utils.data import Dataset

from ..checks import check_int

__all__ = [
    "BLUE",
    "Box",
    "sample_rectangle",
    "paint_rectangle",
    "RectanglePairs",
    "DigitPairs",
]

Color = tuple[float, float, float]  # red, green, blue in [0, 1]

BLUE: Color = (0.0, 0.0, 1.0)
AREA = (0.01, 0.99)  # fraction of the image a training rectangle covers
ASPECT = (0.5, 1.5)  # width / height of a training rectangle

# Rounding to whole pixels rejects some draws; ranges for which fewer than this fraction of draws
# survive are refused up front, so that the sampling loops below end (after at most _MAX_DRAWS
# draws per rectangle the chance of still having none is below e^-100).
_MIN_ACCEPTANCE = 1e-3
_MAX_DRAWS = 100_000
_ACCEPTANCE_GRID = 256  # the acceptance rate is measured on a 256 x 256 grid of (area, aspect) draws


@dataclass(frozen=True)
class Box:
    """A rectangle of whole pixels: rows ``top .. top + height - 1``, columns ``left .. left + width - 1``."""

    top: int
    left: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("top", "left", "height", "width"):
            value = getattr(self, name)
            minimum = 0 if name in ("top", "left") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"Box.{name} must be an int >= {minimum}, got {value!r}")

    @property
    def bottom(self) -> int:
        """One past the last row."""
        return self.top + self.height

    @property
    def right(self) -> int:
        """One past the last column."""
        return self.left + self.width

    @property
    def area(self) -> int:
        return self.height * self.width

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height

    def area_fraction(self, height: int, width: int) -> float:
        """The fraction of a ``height`` x ``width`` image this box covers."""
        return self.area / (height * width)

    def fits(self, height: int, width: int) -> bool:
        """Whether the box lies inside a ``height`` x ``width`` image."""
        return self.bottom <= height and self.right <= width

    def slices(self) -> tuple[slice, slice]:
        """(rows, columns) slices of the box, for ``tensor[..., rows, columns]``."""
        return slice(self.top, self.bottom), slice(self.left, self.right)


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_range(value: object, name: str, *, upper: float | None) -> tuple[float, float]:
    """(low, high) floats with 0 < low <= high (<= upper when given)."""
    limit = f" <= {upper}" if upper is not None else ""
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or not all(isinstance(v, Real) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be a pair of numbers (low, high), got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not (0.0 < low <= high and math.isfinite(high) and (upper is None or high <= upper)):
        raise ValueError(f"{name} must satisfy 0 < low <= high{limit}, got {value!r}")
    return low, high


def _check_fraction(value: object, name: str) -> float:
    if not isinstance(value, Real) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_color(color: object) -> Color:
    if (
        not isinstance(color, Sequence)
        or isinstance(color, str)
        or len(color) != 3
        or not all(isinstance(v, Real) and not isinstance(v, bool) for v in color)
    ):
        raise TypeError(f"color must be three numbers (red, green, blue) in [0, 1], got {color!r}")
    if not all(0.0 <= float(v) <= 1.0 for v in color):
        raise ValueError(f"color must be three numbers (red, green, blue) in [0, 1], got {color!r}")
    return float(color[0]), float(color[1]), float(color[2])


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    return generator


def _check_seed(seed: object) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return seed


def _check_uint8_images(images: object, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        hint = f" (pass {name}.images)" if hasattr(images, "images") and hasattr(images, "labels") else ""
        raise TypeError(f"{name} must be a uint8 tensor (N, C, H, W), got {type(images).__name__}{hint}")
    if images.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 (N, C, H, W) with values 0..255, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, C, H, W) with N >= 1 and C = 1 or 3, got {tuple(images.shape)}")
    return images


def _fill_values(color: Color, channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(C,) fill values: the colour for RGB, its mean for grey (blue becomes grey 1/3: a defect
    as distinct from the surface as the colour would be, without favouring a channel)."""
    values = color if channels == 3 else (sum(color) / 3.0,)
    return torch.tensor(values, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# rectangle sizes: uniform draws of (area fraction, aspect), rounded to pixels, rejected until they fit


def _satisfies(
    h: np.ndarray, w: np.ndarray, height: int, width: int, area: tuple[float, float], aspect: tuple[float, float]
) -> np.ndarray:
    """Whether integer (h, w) boxes fit a ``height`` x ``width`` image with area fraction and
    aspect (w / h) in the ranges: the one test every sampler and the feasibility check use."""
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = (h * w) / (height * width)
        ratio = w / h
    return (
        (h >= 1)
        & (w >= 1)
        & (h <= height)
        & (w <= width)
        & (fraction >= area[0])
        & (fraction <= area[1])
        & (ratio >= aspect[0])
        & (ratio <= aspect[1])
    )


def _rounded_sizes(
    u_area: np.ndarray,
    u_aspect: np.ndarray,
    height: int,
    width: int,
    area: tuple[float, float],
    aspect: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate (h, w, accepted) from uniforms in [0, 1): area fraction and aspect drawn
    uniformly in their ranges, h = round(sqrt(A / r)), w = round(sqrt(A * r)) for A pixels."""
    pixels = (area[0] + (area[1] - area[0]) * u_area) * (height * width)
    ratio = aspect[0] + (aspect[1] - aspect[0]) * u_aspect
    h = np.rint(np.sqrt(pixels / ratio)).astype(np.int64)
    w = np.rint(np.sqrt(pixels * ratio)).astype(np.int64)
    return h, w, _satisfies(h, w, height, width, area, aspect)


@functools.lru_cache(maxsize=256)
def _sampleable(height: int, width: int, area: tuple[float, float], aspect: tuple[float, float]) -> str | None:
    """None when rectangles can be sampled, else the reason (for a ValueError)."""
    ranges = (
        f"area fraction in [{area[0]:g}, {area[1]:g}] and aspect (width / height) in [{aspect[0]:g}, {aspect[1]:g}]"
    )
    # Feasible widths of each height form an interval; its ends, computed in floats, are off by
    # at most one, so the exact test on their neighbours finds a box whenever one exists.
    h = np.arange(1, height + 1, dtype=np.int64)
    low = np.maximum(np.ceil(area[0] * height * width / h), np.ceil(aspect[0] * h))
    high = np.minimum(np.floor(area[1] * height * width / h), np.floor(aspect[1] * h))
    candidates = np.clip(np.stack([low - 1, low, low + 1, high - 1, high, high + 1]), 1, width).astype(np.int64)
    if not _satisfies(np.broadcast_to(h, candidates.shape), candidates, height, width, area, aspect).any():
        return f"no rectangle of whole pixels inside a {height}x{width} image has {ranges}"
    grid = (np.arange(_ACCEPTANCE_GRID) + 0.5) / _ACCEPTANCE_GRID
    u_area, u_aspect = np.meshgrid(grid, grid, indexing="ij")
    accepted = _rounded_sizes(u_area.ravel(), u_aspect.ravel(), height, width, area, aspect)[2].mean()
    if accepted < _MIN_ACCEPTANCE:
        return (
            f"rectangles with {ranges} exist in a {height}x{width} image, but rounding to whole pixels "
            f"rejects {100 * (1 - accepted):.2f} % of draws; widen the ranges"
        )
    return None


def _require_sampleable(height: int, width: int, area: tuple[float, float], aspect: tuple[float, float]) -> None:
    reason = _sampleable(height, width, area, aspect)
    if reason is not None:
        raise ValueError(reason)


def sample_rectangle(
    height: int,
    width: int,
    generator: torch.Generator,
    *,
    area: tuple[float, float] = AREA,
    aspect: tuple[float, float] = ASPECT,
) -> Box:
    """A random rectangle inside a ``height`` x ``width`` image.

    The area fraction and the aspect (width / height) are drawn uniformly in ``area`` and
    ``aspect``, the sides rounded to whole pixels, and the draw rejected and repeated until the
    realised box has its area fraction and aspect in the ranges and fits the image: the ranges
    hold exactly for the returned box, not only before rounding. The position is uniform over
    all positions where the box fits.

    Raises ValueError when no box of whole pixels satisfies the ranges for this image size, or
    when rounding rejects nearly all draws (ranges too narrow for the size).
    """
    check_int(height, "height", meaning="image height in pixels")
    check_int(width, "width", meaning="image width in pixels")
    _check_generator(generator)
    area = _check_range(area, "area", upper=1.0)
    aspect = _check_range(aspect, "aspect", upper=None)
    _require_sampleable(height, width, area, aspect)
    chunk = 16
    for _ in range(_MAX_DRAWS // chunk):
        u = torch.rand(2, chunk, dtype=torch.float64, generator=generator).numpy()
        h, w, accepted = _rounded_sizes(u[0], u[1], height, width, area, aspect)
        if accepted.any():
            first = int(np.argmax(accepted))
            box_h, box_w = int(h[first]), int(w[first])
            top = int(torch.randint(0, height - box_h + 1, (), generator=generator))
            left = int(torch.randint(0, width - box_w + 1, (), generator=generator))
            return Box(top, left, box_h, box_w)
    raise ValueError(
        f"no rectangle accepted in {_MAX_DRAWS} draws for a {height}x{width} image with area {area} and aspect {aspect}"
    )  # unreachable after _require_sampleable


def paint_rectangle(image: torch.Tensor, box: Box, color: Color = BLUE) -> tuple[torch.Tensor, torch.Tensor]:
    """Paints ``box`` filled with ``color`` on a copy of ``image``.

    ``image``: float (C, H, W), C = 3 (RGB; ``color`` in [0, 1] per channel) or 1 (grey; filled
    with the mean of ``color``). Returns (the painted copy, same dtype and device; bool (H, W)
    mask, True inside the box). ``image`` itself is left untouched.
    """
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise TypeError(
            f"image must be a floating tensor (C, H, W) in [0, 1], got "
            f"{image.dtype if isinstance(image, torch.Tensor) else type(image).__name__}"
        )
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (C, H, W) with C = 1 or 3, got {tuple(image.shape)}")
    if not isinstance(box, Box):
        raise TypeError(f"box must be a Box, got {type(box).__name__}")
    height, width = image.shape[1:]
    if not box.fits(height, width):
        raise ValueError(f"{box} does not fit inside the {height}x{width} image")
    fill = _fill_values(_check_color(color), image.shape[0], image.dtype, image.device)
    rows, cols = box.slices()
    painted = image.clone()
    painted[:, rows, cols] = fill[:, None, None]
    mask = torch.zeros(height, width, dtype=torch.bool, device=image.device)
    mask[rows, cols] = True
    return painted, mask


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
        self.seed = _check_seed(seed)
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
        self.images = _check_uint8_images(images)
        super().__init__(images.shape[0], images.shape[0] if n_pairs is None else n_pairs, seed)
        self.p_defect = _check_fraction(p_defect, "p_defect")
        self.area = _check_range(area, "area", upper=1.0)
        self.aspect = _check_range(aspect, "aspect", upper=None)
        self.color = _check_color(color)
        self._height, self._width = int(images.shape[2]), int(images.shape[3])
        _require_sampleable(self._height, self._width, self.area, self.aspect)
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
        for round_ in range(_MAX_DRAWS):
            if pending.size == 0:
                break
            stream = 16 + 4 * round_ + 2 * slot
            h, w, accepted = _rounded_sizes(
                _uniform(keys[pending], stream),
                _uniform(keys[pending], stream + 1),
                height,
                width,
                self.area,
                self.aspect,
            )
            sizes[pending[accepted]] = np.stack([h[accepted], w[accepted]], axis=1)
            pending = pending[~accepted]
        if pending.size:  # unreachable in practice: see _MIN_ACCEPTANCE
            raise ValueError(
                f"no rectangle accepted in {_MAX_DRAWS} draws for a {height}x{width} image "
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
        fill = _fill_values(self.color, self.images.shape[1], torch.float32, device)[None, :, None, None]
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
        self.images = _check_uint8_images(images)
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
            None if similar_fraction is None else _check_fraction(similar_fraction, "similar_fraction")
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

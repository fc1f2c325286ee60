"""The training defect of the Siamese network: a filled rectangle (blue by default) covering an
area fraction and with an aspect (width / height) drawn uniformly in ranges, rounded to whole
pixels and redrawn until the rounded box itself is in the ranges.

:func:`sample_rectangle` and :func:`paint_rectangle` make one; the pair data sets
(:mod:`.pairs`) draw many at once with the same size rule (:func:`rounded_sizes`,
:func:`require_sampleable`) and checks. The functions here take a ``torch.Generator``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import numpy as np
import torch

from ..checks import check_generator, check_int

__all__ = [
    "AREA",
    "ASPECT",
    "BLUE",
    "Box",
    "Color",
    "MAX_DRAWS",
    "check_color",
    "check_float_image",
    "check_range",
    "check_uint8_images",
    "fill_values",
    "paint_rectangle",
    "require_sampleable",
    "rounded_sizes",
    "sample_rectangle",
]

Color = tuple[float, float, float]  # red, green, blue in [0, 1]

BLUE: Color = (0.0, 0.0, 1.0)
AREA = (0.01, 0.99)  # fraction of the image a training rectangle covers
ASPECT = (0.5, 1.5)  # width / height of a training rectangle

# Rounding to whole pixels rejects some draws; ranges for which fewer than this fraction of draws
# survive are refused up front, so that the sampling loops below end (after at most MAX_DRAWS
# draws per rectangle the chance of still having none is below e^-100).
MIN_ACCEPTANCE = 1e-3
MAX_DRAWS = 100_000
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
            check_int(value, f"Box.{name}", minimum=minimum)

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


def check_range(value: object, name: str, *, upper: float | None) -> tuple[float, float]:
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


def check_color(color: object) -> Color:
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


def check_uint8_images(images: object, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        hint = f" (pass {name}.images)" if hasattr(images, "images") and hasattr(images, "labels") else ""
        raise TypeError(f"{name} must be a uint8 tensor (N, C, H, W), got {type(images).__name__}{hint}")
    if images.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 (N, C, H, W) with values 0..255, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, C, H, W) with N >= 1 and C = 1 or 3, got {tuple(images.shape)}")
    return images


def fill_values(color: Color, channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
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


def rounded_sizes(
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
    accepted = rounded_sizes(u_area.ravel(), u_aspect.ravel(), height, width, area, aspect)[2].mean()
    if accepted < MIN_ACCEPTANCE:
        return (
            f"rectangles with {ranges} exist in a {height}x{width} image, but rounding to whole pixels "
            f"rejects {100 * (1 - accepted):.2f} % of draws; widen the ranges"
        )
    return None


def require_sampleable(height: int, width: int, area: tuple[float, float], aspect: tuple[float, float]) -> None:
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
    check_generator(generator)
    area = check_range(area, "area", upper=1.0)
    aspect = check_range(aspect, "aspect", upper=None)
    require_sampleable(height, width, area, aspect)
    chunk = 16
    for _ in range(MAX_DRAWS // chunk):
        u = torch.rand(2, chunk, dtype=torch.float64, generator=generator).numpy()
        h, w, accepted = rounded_sizes(u[0], u[1], height, width, area, aspect)
        if accepted.any():
            first = int(np.argmax(accepted))
            box_h, box_w = int(h[first]), int(w[first])
            top = int(torch.randint(0, height - box_h + 1, (), generator=generator))
            left = int(torch.randint(0, width - box_w + 1, (), generator=generator))
            return Box(top, left, box_h, box_w)
    raise ValueError(
        f"no rectangle accepted in {MAX_DRAWS} draws for a {height}x{width} image with area {area} and aspect {aspect}"
    )  # unreachable after _require_sampleable


def check_float_image(image: object) -> torch.Tensor:
    """``image`` if it is a floating (C, H, W) tensor with C = 1 or 3 (what rectangles are painted on)."""
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise TypeError(
            f"image must be a floating tensor (C, H, W) in [0, 1], got "
            f"{image.dtype if isinstance(image, torch.Tensor) else type(image).__name__}"
        )
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (C, H, W) with C = 1 or 3, got {tuple(image.shape)}")
    return image


def paint_rectangle(image: torch.Tensor, box: Box, color: Color = BLUE) -> tuple[torch.Tensor, torch.Tensor]:
    """Paints ``box`` filled with ``color`` on a copy of ``image``.

    ``image``: float (C, H, W), C = 3 (RGB; ``color`` in [0, 1] per channel) or 1 (grey; filled
    with the mean of ``color``). Returns (the painted copy, same dtype and device; bool (H, W)
    mask, True inside the box). ``image`` itself is left untouched.
    """
    check_float_image(image)
    if not isinstance(box, Box):
        raise TypeError(f"box must be a Box, got {type(box).__name__}")
    height, width = image.shape[1:]
    if not box.fits(height, width):
        raise ValueError(f"{box} does not fit inside the {height}x{width} image")
    fill = fill_values(check_color(color), image.shape[0], image.dtype, image.device)
    rows, cols = box.slices()
    painted = image.clone()
    painted[:, rows, cols] = fill[:, None, None]
    mask = torch.zeros(height, width, dtype=torch.bool, device=image.device)
    mask[rows, cols] = True
    return painted, mask

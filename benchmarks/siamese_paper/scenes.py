"""The paper's test scenes, built from the library's rectangle defect (``fastad.siamese.rectangles``:
``sample_rectangle`` and the training colour fill):

* :func:`mosaic_pair`: a template mosaic of small images and the same mosaic with a rectangle in a
  known set of cells (experiment 3);
* :func:`aerial_template` and :func:`scatter_rectangles`: a large template tiled from equally
  sized images and many small rectangles scattered over it (experiment 4).

Every random draw comes from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastad.checks import check_fraction, check_generator, check_int
from fastad.siamese.rectangles import (
    BLUE,
    Color,
    check_color,
    check_float_image,
    check_uint8_images,
    fill_values,
    sample_rectangle,
)

__all__ = ["aerial_template", "mosaic_pair", "scatter_rectangles"]


def mosaic_pair(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    grid: int = 10,
    defect_fraction: float = 0.5,
    color: Color = BLUE,
) -> dict[str, torch.Tensor]:
    """A template mosaic and the same mosaic with rectangles in a known set of cells.

    ``images``: uint8 (grid * grid, C, h, w), tiled row-major (image ``r * grid + c`` in cell
    (r, c)). Exactly ``round(defect_fraction * grid * grid)`` cells (Python's rounding, half to
    even), chosen uniformly, receive one rectangle each, drawn as in training
    (``sample_rectangle`` within the cell).

    Returns ``template`` and ``inspected`` float32 (C, grid * h, grid * w) in [0, 1], ``mask`` bool
    (grid * h, grid * w) (True on the rectangles) and ``cell_labels`` bool (grid, grid).
    """
    check_int(grid, "grid", meaning="cells per side of the mosaic")
    check_uint8_images(images)
    if images.shape[0] != grid * grid:
        raise ValueError(
            f"images must hold grid * grid = {grid * grid} images for a {grid}x{grid} mosaic, got {images.shape[0]}"
        )
    check_generator(generator)
    defect_fraction = check_fraction(defect_fraction, "defect_fraction")
    channels, height, width = (int(v) for v in images.shape[1:])
    fill = fill_values(check_color(color), channels, torch.float32, images.device)[:, None, None]

    tiles = images.to(torch.float32).div_(255.0).view(grid, grid, channels, height, width)
    template = tiles.permute(2, 0, 3, 1, 4).reshape(channels, grid * height, grid * width)
    inspected = template.clone()
    mask = torch.zeros(grid * height, grid * width, dtype=torch.bool, device=images.device)
    cell_labels = torch.zeros(grid, grid, dtype=torch.bool)
    defects = round(defect_fraction * grid * grid)
    for cell in sorted(torch.randperm(grid * grid, generator=generator)[:defects].tolist()):
        row, col = divmod(cell, grid)
        box = sample_rectangle(height, width, generator)
        rows = slice(row * height + box.top, row * height + box.bottom)
        cols = slice(col * width + box.left, col * width + box.right)
        inspected[:, rows, cols] = fill
        mask[rows, cols] = True
        cell_labels[row, col] = True
    return {"template": template, "inspected": inspected, "mask": mask, "cell_labels": cell_labels.to(images.device)}


def scatter_rectangles(
    image: torch.Tensor,
    generator: torch.Generator,
    *,
    count: int = 100,
    size: tuple[int, int] = (5, 15),
    color: Color = BLUE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` filled rectangles at random on a copy of ``image`` (the high-resolution test).

    ``image``: float (C, H, W), C = 1 or 3. Each rectangle's height and width are drawn
    independently and uniformly among the integers ``size[0] .. size[1]`` (inclusive), its
    position uniformly among those where it lies fully inside the image; rectangles may overlap.
    Returns (the painted copy, bool (H, W) mask of the union of the rectangles).
    """
    check_float_image(image)
    check_generator(generator)
    check_int(count, "count", minimum=0, meaning="the number of rectangles")
    height, width = int(image.shape[1]), int(image.shape[2])
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        raise TypeError(f"size must be a pair of ints (smallest, largest side in pixels), got {size!r}")
    if not 1 <= size[0] <= size[1] <= min(height, width):
        raise ValueError(
            f"size must satisfy 1 <= smallest <= largest <= {min(height, width)} "
            f"(the {height}x{width} image's shorter side), got {tuple(size)}"
        )
    fill = fill_values(check_color(color), image.shape[0], image.dtype, image.device)[:, None, None]
    sides = torch.randint(size[0], size[1] + 1, (2, count), generator=generator)  # heights, widths
    positions = torch.rand(2, count, dtype=torch.float64, generator=generator)
    tops = (positions[0] * (height - sides[0] + 1)).floor().long().clamp_max(height - sides[0])
    lefts = (positions[1] * (width - sides[1] + 1)).floor().long().clamp_max(width - sides[1])
    rows = torch.arange(height)
    cols = torch.arange(width)
    in_rows = (rows >= tops[:, None]) & (rows < (tops + sides[0])[:, None])  # (count, H)
    in_cols = (cols >= lefts[:, None]) & (cols < (lefts + sides[1])[:, None])  # (count, W)
    # Union of the rectangles as a (H, W) matrix product of row and column memberships.
    mask = (in_rows.T.to(torch.float32) @ in_cols.to(torch.float32) > 0).to(image.device)
    return torch.where(mask, fill, image), mask


def aerial_template(images: Sequence[torch.Tensor], height: int = 720, width: int = 1260) -> torch.Tensor:
    """One ``height`` x ``width`` template from equally sized images, tiled row-major and cropped.

    ``images``: (C, h, w) tensors of one shape and dtype (or one (N, C, h, w) tensor). The first
    ``ceil(height / h) * ceil(width / w)`` fill the grid row by row (image ``r * columns + c`` at
    grid cell (r, c)); the grid is cropped to its top-left ``height`` x ``width``. Returns
    (C, height, width) of the images' dtype. Raises ValueError when there are too few images.
    """
    check_int(height, "height", meaning="template height in pixels")
    check_int(width, "width", meaning="template width in pixels")
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images as one tensor must be (N, C, h, w), got shape {tuple(images.shape)}")
        images = list(images)
    if not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError("images must be a non-empty sequence of (C, h, w) tensors")
    first = images[0]
    if not isinstance(first, torch.Tensor) or first.dim() != 3 or first.shape[1] == 0 or first.shape[2] == 0:
        raise ValueError(f"images[0] must be a (C, h, w) tensor, got {getattr(first, 'shape', type(first).__name__)}")
    for position, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.shape != first.shape or image.dtype != first.dtype:
            got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(
                f"images must share one shape and dtype: images[0] is {first.dtype} {tuple(first.shape)}, "
                f"images[{position}] is {got}"
            )
    channels, tile_h, tile_w = (int(v) for v in first.shape)
    grid_rows, grid_cols = math.ceil(height / tile_h), math.ceil(width / tile_w)
    needed = grid_rows * grid_cols
    if len(images) < needed:
        raise ValueError(
            f"a {height}x{width} template needs {grid_rows}x{grid_cols} = {needed} images of "
            f"{tile_h}x{tile_w}, got {len(images)}"
        )
    tiles = torch.stack(list(images[:needed])).view(grid_rows, grid_cols, channels, tile_h, tile_w)
    mosaic = tiles.permute(2, 0, 3, 1, 4).reshape(channels, grid_rows * tile_h, grid_cols * tile_w)
    return mosaic[:, :height, :width].contiguous()

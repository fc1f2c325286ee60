"""Shared by the tests of training rectangles and of the paper's scenes: the statistical
significance, random images, and reading boxes back from masks."""

from __future__ import annotations

import torch

from fastad.siamese import Box

# Significance of the statistical checks. The suite makes about 30 of them on fresh draws, so at
# 1e-4 a correct implementation failed about 1 run in 300; at 1e-6 it fails about 1 in 30,000,
# while the faults they look for (a wrong range, law or weighting over thousands of draws) give
# p-values many orders of magnitude smaller still.
P_MIN = 1e-6


def random_uint8_images(
    rng: torch.Generator, n: int, channels: int = 3, height: int = 12, width: int = 10
) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, height, width), dtype=torch.uint8, generator=rng)


def as_box(mask: torch.Tensor) -> Box:
    """The box a mask is, asserting that it is exactly one filled rectangle."""
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    box = Box(int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1))
    assert int(mask.sum()) == box.area, "mask is not one filled rectangle"
    return box


def boxes_of(masks: torch.Tensor) -> torch.Tensor:
    """(B, 4) int64 (top, left, height, width) of non-empty (B, H, W) masks, asserting that each is
    exactly one filled rectangle."""
    rows, cols = masks.any(2), masks.any(1)
    top, left = rows.int().argmax(1), cols.int().argmax(1)
    height, width = rows.sum(1), cols.sum(1)
    assert bool(rows.any(1).all()), "empty mask"
    for lines in (rows, cols):  # contiguous: at most one switch on and one off
        assert bool((lines.int().diff(dim=1).abs().sum(1) <= 2).all()), "a mask is not one rectangle"
    assert torch.equal(masks.sum((1, 2)), height * width), "a mask is not one filled rectangle"
    return torch.stack([top, left, height, width], 1)

"""The paper's test scenes (benchmarks/siamese_paper/scenes.py): mosaics with rectangles in known
cells, rectangles scattered over a large image, the aerial template."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from benchmarks.siamese_paper.scenes import aerial_template, mosaic_pair, scatter_rectangles
from fastad.siamese import BLUE

from ..siamese.rectangles import P_MIN, as_box, boxes_of, random_uint8_images


def test_mosaic_pair(rng: torch.Generator, np_rng: np.random.Generator) -> None:
    cases = ((10, 0.5), (5, 0.5), (3, 0.0), (4, 1.0), (int(np_rng.integers(2, 8)), float(np_rng.random())))
    for grid, fraction in cases:
        images = random_uint8_images(rng, grid * grid, 3, 8, 9)
        scene = mosaic_pair(images, rng, grid=grid, defect_fraction=fraction)
        template, inspected, mask, cells = scene["template"], scene["inspected"], scene["mask"], scene["cell_labels"]
        assert template.shape == inspected.shape == (3, grid * 8, grid * 9) and template.dtype == torch.float32
        assert mask.shape == (grid * 8, grid * 9) and cells.shape == (grid, grid) and cells.dtype == torch.bool
        assert int(cells.sum()) == round(fraction * grid * grid)  # 12 of 25 at one half: Python rounds half to even
        for r in range(grid):
            for c in range(grid):
                rows, cols = slice(r * 8, (r + 1) * 8), slice(c * 9, (c + 1) * 9)
                assert torch.equal(template[:, rows, cols], images[r * grid + c].float() / 255)
                cell_mask = mask[rows, cols]
                assert bool(cell_mask.any()) == bool(cells[r, c])
                if cells[r, c]:
                    box = as_box(cell_mask)
                    assert 0.01 <= box.area_fraction(8, 9) <= 0.99 and 0.5 <= box.aspect <= 1.5
        assert torch.equal(inspected[:, ~mask], template[:, ~mask])
        assert torch.equal(inspected[:, mask], torch.tensor(BLUE)[:, None].expand(-1, int(mask.sum())))
    assert mosaic_pair(random_uint8_images(rng, 100, 3, 32, 32), rng)["template"].shape == (3, 320, 320)


def test_mosaic_pair_is_seeded_and_checks_arguments(rng: torch.Generator) -> None:
    images = random_uint8_images(rng, 16)
    a = mosaic_pair(images, torch.Generator().manual_seed(4), grid=4)
    b = mosaic_pair(images, torch.Generator().manual_seed(4), grid=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="grid \\* grid = 9"):
        mosaic_pair(images, rng, grid=3)
    with pytest.raises(ValueError, match="defect_fraction"):
        mosaic_pair(images, rng, grid=4, defect_fraction=2)
    with pytest.raises(TypeError, match="uint8"):
        mosaic_pair(images.float(), rng, grid=4)
    with pytest.raises(ValueError, match="grid"):
        mosaic_pair(images, rng, grid=0)


def test_scatter_rectangle_sides_and_positions(rng: torch.Generator, np_rng: np.random.Generator) -> None:
    image = torch.rand(3, 40, 50, generator=rng)
    painted, masks = zip(*(scatter_rectangles(image, rng, count=1, size=(5, 15)) for _ in range(400)), strict=True)
    masks = torch.stack(masks)
    for x, mask in zip(painted[:50], masks, strict=False):
        assert torch.equal(x[:, ~mask], image[:, ~mask])
    top, left, height, width = boxes_of(masks).unbind(1)
    assert bool(((top + height <= 40) & (left + width <= 50)).all())
    for sides in (height, width):
        counts = torch.bincount(sides, minlength=16).numpy()
        assert counts[:5].sum() == 0 and len(counts) == 16  # all within 5 .. 15
        assert stats.chisquare(counts[5:]).pvalue > P_MIN  # uniform over the 11 side lengths
    for first, room in ((top, 40 - height + 1), (left, 50 - width + 1)):
        pit = (first.numpy() + np_rng.random(400)) / room.numpy()
        assert stats.kstest(pit, "uniform").pvalue > P_MIN


def test_scatter_many_rectangles(rng: torch.Generator) -> None:
    image = torch.rand(1, 120, 200, generator=rng, dtype=torch.float64)
    painted, mask = scatter_rectangles(image, rng, count=100, size=(5, 15), color=(0.0, 0.3, 0.9))
    assert painted.dtype == torch.float64 and mask.shape == (120, 200)
    assert 100 * 25 / 4 < int(mask.sum()) <= 100 * 15 * 15
    assert torch.allclose(painted[0, mask], torch.tensor(0.4, dtype=torch.float64))
    assert torch.equal(painted[:, ~mask], image[:, ~mask])
    same = scatter_rectangles(image, torch.Generator().manual_seed(1), count=7)[1]
    assert torch.equal(same, scatter_rectangles(image, torch.Generator().manual_seed(1), count=7)[1])
    assert not scatter_rectangles(image, rng, count=0)[1].any()
    with pytest.raises(ValueError, match="size"):
        scatter_rectangles(image, rng, size=(5, 121))
    with pytest.raises(ValueError, match="size"):
        scatter_rectangles(image, rng, size=(6, 5))
    with pytest.raises(TypeError, match="size"):
        scatter_rectangles(image, rng, size=(5.0, 6))
    with pytest.raises(ValueError, match="count"):
        scatter_rectangles(image, rng, count=-1)
    with pytest.raises(TypeError, match="floating"):
        scatter_rectangles(image.to(torch.uint8), rng)


def test_aerial_template(rng: torch.Generator) -> None:
    tiles = [torch.rand(3, 256, 256, generator=rng) for _ in range(16)]
    template = aerial_template(tiles)
    assert template.shape == (3, 720, 1260) and template.is_contiguous()
    columns = math.ceil(1260 / 256)  # 5 per row, 3 rows: 15 tiles used
    for r in range(3):
        for c in range(columns):
            part = template[:, r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
            assert torch.equal(part, tiles[r * columns + c][:, : part.shape[1], : part.shape[2]])
    stacked = torch.stack(tiles).mul(255).to(torch.uint8)
    small = aerial_template(stacked, 300, 300)
    assert small.dtype == torch.uint8 and torch.equal(small[:, :256, 256:], stacked[1][:, :, :44])
    with pytest.raises(ValueError, match="needs 3x5 = 15 images of 256x256, got 14"):
        aerial_template(tiles[:14])
    with pytest.raises(ValueError, match=r"images\[2\]"):
        aerial_template(tiles[:2] + [torch.rand(3, 128, 256)] + tiles[3:])
    with pytest.raises(ValueError, match="non-empty"):
        aerial_template([])
    with pytest.raises(ValueError, match="height"):
        aerial_template(tiles, 0)

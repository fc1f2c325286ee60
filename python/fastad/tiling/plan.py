"""Planning tiles: the core, read window and output place of every tile, and the checks of the
tiling arguments shared by the tiled functions and the receptive-field probe."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..checks import check_int


@dataclass(frozen=True)
class Tile:
    """One output tile: its core in input pixels, the window read for it, and where it goes."""

    y0: int  # core rows [y0, y1), columns [x0, x1); y0, x0 are multiples of the stride
    y1: int
    x0: int
    x1: int
    ya: int  # read window rows [ya, yb), columns [xa, xb): core plus halo, clipped to the image
    yb: int
    xa: int
    xb: int

    def window_shape(self) -> tuple[int, int]:
        return (self.yb - self.ya, self.xb - self.xa)

    def output_core(self, stride: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """Where the core's outputs at ``stride`` go in the image's output map (rows, columns),
        and where they lie in the window's output (the halo's share cropped)."""
        oy0, ox0 = self.y0 // stride, self.x0 // stride
        oy1, ox1 = -(-self.y1 // stride), -(-self.x1 // stride)
        cy, cx = (self.y0 - self.ya) // stride, (self.x0 - self.xa) // stride
        return (slice(oy0, oy1), slice(ox0, ox1)), (slice(cy, cy + oy1 - oy0), slice(cx, cx + ox1 - ox0))


def axis_spans(length: int, tile: int, halo: int, residue_of: int = 0) -> list[tuple[int, int, int, int]]:
    """(core start, core end, window start, window end) along one axis. With ``residue_of`` > 0
    each window is extended at its end (within the image) until its length is congruent to the
    image's modulo ``residue_of``."""
    spans = []
    for start in range(0, length, tile):
        end = min(start + tile, length)
        w0, w1 = max(0, start - halo), min(length, end + halo)
        if residue_of:
            w1 = min(length, w1 + (length - (w1 - w0)) % residue_of)
        spans.append((start, end, w0, w1))
    return spans


def plan_tiles(height: int, width: int, tile: int, halo: int, residue_of: int = 0) -> list[Tile]:
    rows, cols = axis_spans(height, tile, halo, residue_of), axis_spans(width, tile, halo, residue_of)
    return [Tile(y0, y1, x0, x1, ya, yb, xa, xb) for (y0, y1, ya, yb) in rows for (x0, x1, xa, xb) in cols]


def tile_batches(tiles: list[Tile], batch_tiles: int) -> Iterator[list[Tile]]:
    """Groups of at most ``batch_tiles`` tiles of equal window size, in row-major order.

    Windows clipped at the image border are smaller, so tiles are bucketed by window size; a
    bucket is emitted as soon as it is full, so only tile *descriptions* wait, never pixels.
    """
    pending: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        bucket = pending.setdefault(t.window_shape(), [])
        bucket.append(t)
        if len(bucket) == batch_tiles:
            yield pending.pop(t.window_shape())
    yield from pending.values()


def check_tiling_args(tile, halo, stride, batch_tiles, align=None) -> tuple[int, int, int, int, int]:
    stride = check_int(stride, "stride", minimum=1)
    align = stride if align is None else check_int(align, "align", minimum=1)
    tile = check_int(tile, "tile", minimum=1)
    halo = check_int(halo, "halo", minimum=0)
    batch_tiles = check_int(batch_tiles, "batch_tiles", minimum=1)
    if align % stride:
        raise ValueError(f"align={align} must be a multiple of stride={stride} (windows start on the output grid)")
    grid = "stride" if align == stride else "align"
    if tile % align:
        raise ValueError(
            f"tile={tile} must be a multiple of {grid}={align}: tiles start at multiples of it so "
            f"that each tile's strided layers sample the same grid as the untiled call "
            f"(try tile={max(align, tile - tile % align)})"
        )
    if halo % align:
        raise ValueError(
            f"halo={halo} must be a multiple of {grid}={align}: a tile's window starts halo input "
            f"pixels before its core, and that start must lie on the same grid; use "
            f"halo={-(-halo // align) * align}"
        )
    return tile, halo, stride, batch_tiles, align

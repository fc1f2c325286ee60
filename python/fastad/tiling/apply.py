"""Running a fully-convolutional function tile by tile over a reader and stitching the outputs
(``tiled_apply``), or visiting the tiles' windows and cores (``tile_windows``, ``tiled_cores``,
``tiled_sum``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from .._progress import progress_bar
from ..distributed import shard
from .plan import Tile, check_tiling_args, plan_tiles, tile_batches
from .readers import TileReader, open_reader
from .receptive_field import probe_placement, receptive_field


def _host_dtype(dtype: torch.dtype) -> torch.dtype:
    """Outputs are stored in float64 when fn gives float64, else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _numpy_dtype_for(dtype: torch.dtype) -> np.dtype:
    return np.dtype(np.float64) if _host_dtype(dtype) == torch.float64 else np.dtype(np.float32)


def _check_output(y, tiles: list[Tile], stride: int) -> None:
    if not isinstance(y, Tensor):
        raise TypeError(f"fn must return a torch.Tensor, got {type(y).__name__}")
    h, w = tiles[0].window_shape()
    expected = (len(tiles), -(-h // stride), -(-w // stride))
    if y.dim() != 4 or (y.shape[0], y.shape[2], y.shape[3]) != expected:
        raise ValueError(
            f"fn returned shape {tuple(y.shape)} for input tiles of shape ({len(tiles)}, C, {h}, {w}); "
            f"with stride={stride} a fully-convolutional fn must return (N, C_out, ceil(h/s), ceil(w/s)) "
            f"= ({expected[0]}, C_out, {expected[1]}, {expected[2]}), the size the untiled call gives "
            f"an image of that size. Padded convolutions (padding = dilation*(k-1)//2, odd k) and "
            f"pooling with padding or ceil_mode=True keep this; valid convolutions, floor-mode "
            f"pooling on odd sizes or a wrong stride do not"
        )


def tiled_apply(
    fn: Callable[[Tensor], Tensor],
    reader: TileReader | str | os.PathLike | np.ndarray | Tensor,
    *,
    tile: int,
    halo: int,
    stride: int = 1,
    out: np.ndarray | None = None,
    device: str | torch.device | None = None,
    batch_tiles: int = 1,
    progress: bool | None = None,
    dtype: torch.dtype | None = None,
    check_halo: bool = False,
    align: int | None = None,
    same_padding: bool = False,
) -> np.ndarray:
    """Apply a fully-convolutional ``fn`` tile by tile; the result equals the untiled call.

    Args:
        fn: maps (N, C, h, w) ``dtype`` tensors on ``device`` to (N, C_out, ceil(h/s), ceil(w/s));
            output (i, j) depends only on input within ``halo`` pixels of (i*s, j*s), and the
            image border is zero padding inside ``fn`` (see the module docstring).
        reader: a :class:`TileReader`, or anything :func:`open_reader` accepts.
        tile: core size of a tile in input pixels (square), a multiple of ``stride``; the
            right/bottom tiles are cut to the image. Memory per call is about
            ``batch_tiles * C * (tile + 2*halo)**2`` values plus ``fn``'s activations.
        halo: extra input pixels read on every side of a core, a multiple of ``stride`` and at
            least ``fn``'s receptive-field radius (measure it with :func:`receptive_field`); too
            small a halo silently gives wrong values near tile edges.
        stride: ``fn``'s total output stride s >= 1.
        out: (C_out, ceil(H/s), ceil(W/s)) floating-point array or ``np.memmap`` to write into;
            allocated when ``None`` (float64 if ``fn`` returns float64, else float32). If an
            error interrupts the run, ``out`` holds the tiles written so far.
        device: where ``fn`` runs; tiles are moved there and results copied back to the host.
            ``None``: the device of ``fn``'s first parameter if it is a module, else the CPU.
        batch_tiles: tiles per call of ``fn``; only tiles of equal window size are batched.
        progress: show a tqdm bar; ``None`` shows it when stderr is a terminal.
        dtype: floating-point type the tiles are given to ``fn`` in (readers give float32);
            ``None``: the dtype of ``fn``'s first parameter if it is a module, else float32.
        check_halo: first measure ``fn``'s radius with :func:`receptive_field` (about twenty
            small calls) and raise if ``halo`` is below it; an empirical check, not a proof.
        align: window origins (and so ``tile`` and ``halo``) are multiples of this; ``None``:
            ``stride``. Needed when ``fn`` subsamples by more than its output stride inside (a
            feature map at stride 8 built from layers down to stride 16 or 32 and upsampled back):
            then every strided layer must see its untiled sampling grid, so ``align`` is the
            largest stride inside ``fn`` (a multiple of ``stride``).
        same_padding: ``fn`` pads its strided layers like TensorFlow's "same" (the EfficientNet
            ports): a stride-2 layer pads one more pixel at the end than at the start of an input
            of even length, and equally on both sides of an odd one, so its sampling grid follows
            the parity of the whole image. Each window's length is then kept congruent to the
            image's modulo ``align`` (windows grow by up to ``align`` - 1 pixels at their end), which
            keeps every parity, up to the stride ``align``, that of the untiled call.

    Returns:
        ``out``, (C_out, ceil(H/s), ceil(W/s)).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    device, probed_dtype = probe_placement(fn, device, None)
    if dtype is None:
        dtype = probed_dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    tile, halo, stride, batch_tiles, align = check_tiling_args(tile, halo, stride, batch_tiles, align)
    reader = open_reader(reader)
    _, height, width = reader.shape
    out_hw = (-(-height // stride), -(-width // stride))
    if out is not None:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy array or np.memmap, got {type(out).__name__}")
        if out.ndim != 3 or tuple(out.shape[1:]) != out_hw:
            raise ValueError(
                f"out must have shape (C_out, ceil(H/s), ceil(W/s)) = (C_out, {out_hw[0]}, {out_hw[1]}) "
                f"for an image of H={height}, W={width} and stride={stride}, got {tuple(out.shape)}"
            )
        if not np.issubdtype(out.dtype, np.floating):
            raise TypeError(f"out must have a floating-point dtype, got {out.dtype}")
        if not out.flags.writeable:
            raise ValueError("out is read-only (an np.memmap opened with mode='r'?)")

    if check_halo:
        _check_halo_covers_field(fn, reader.shape[0], halo, stride, device, dtype)

    tiles = plan_tiles(height, width, tile, halo, align if same_padding else 0)
    with torch.inference_mode():
        for t, y in _tile_outputs(fn, reader, tiles, batch_tiles, stride, device, dtype, progress, "tiled_apply"):
            if out is None:
                out = np.empty((y.shape[0], *out_hw), dtype=_numpy_dtype_for(y.dtype))
            elif out.shape[0] != y.shape[0]:
                raise ValueError(f"out has {out.shape[0]} channels but fn returns {y.shape[0]}")
            host = y.to("cpu", dtype=_host_dtype(y.dtype)).numpy()
            _write_core(out, host, t, stride)
    return out


def tile_windows(
    reader: TileReader | str | os.PathLike | np.ndarray | Tensor,
    *,
    tile: int,
    halo: int,
    align: int = 1,
    same_padding: bool = False,
    progress: bool | None = None,
) -> Iterator[tuple[tuple[int, int, int, int], tuple[int, int, int, int], Tensor]]:
    """The tiles of an image in row-major order, for callers that need to know where each lies:
    yields ``(core, window, pixels)``, ``core`` = (y0, y1, x0, x1) the tile's own pixels, ``window``
    = (ya, yb, xa, xb) the core plus ``halo`` clipped to the image (grown as
    :func:`tiled_apply` grows it for ``same_padding``), ``pixels`` the window's (C, h, w) float32.
    ``tile`` and ``halo`` are multiples of ``align``; only one window is held at a time."""
    tile, halo, _, _, align = check_tiling_args(tile, halo, 1, 1, align)
    reader = open_reader(reader)
    _, height, width = reader.shape
    tiles = plan_tiles(height, width, tile, halo, align if same_padding else 0)
    bar = progress_bar(len(tiles), "tile_windows", "tile", progress)
    try:
        for t in tiles:
            yield (t.y0, t.y1, t.x0, t.x1), (t.ya, t.yb, t.xa, t.xb), reader.read(t.ya, t.yb, t.xa, t.xb)
            bar.update(1)
    finally:
        bar.close()


def tiled_cores(
    fn: Callable[[Tensor], Tensor],
    reader: TileReader | str | os.PathLike | np.ndarray | Tensor,
    *,
    tile: int,
    halo: int,
    stride: int = 1,
    align: int | None = None,
    same_padding: bool = False,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    part: tuple[int, int] | None = None,
) -> Iterator[tuple[tuple[int, int], Tensor]]:
    """``fn``'s untiled output, one tile's core at a time, never stitched: yields ``((oy, ox),
    core)``, ``core`` the (C_out, oh, ow) output positions of the tile's core on ``device`` and
    ``(oy, ox)`` the first one's place in the whole output. For reductions that need positions
    (sums over a region, the k largest values of each channel) over outputs too large to keep.
    ``part`` (rank, size): only the rank's consecutive block of the tiles (``fastad.distributed.shard``),
    for dividing one image among processes. Arguments as for :func:`tiled_apply`; the caller holds
    ``torch.inference_mode`` if wanted."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    device, dtype = probe_placement(fn, device, None)
    tile, halo, stride, _, align = check_tiling_args(tile, halo, stride, 1, align)
    reader = open_reader(reader)
    _, height, width = reader.shape
    tiles = plan_tiles(height, width, tile, halo, align if same_padding else 0)
    if part is not None:
        block = shard(len(tiles), *part)
        tiles = tiles[block.start : block.stop]
    for t, y in _tile_outputs(fn, reader, tiles, 1, stride, device, dtype, progress, "tiled_cores"):
        (rows, cols), (core_rows, core_cols) = t.output_core(stride)
        yield (rows.start, cols.start), y[:, core_rows, core_cols]


def tiled_sum(
    fn: Callable[[Tensor], Tensor],
    reader: TileReader | str | os.PathLike | np.ndarray | Tensor,
    *,
    tile: int,
    halo: int,
    stride: int = 1,
    align: int | None = None,
    same_padding: bool = False,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> tuple[Tensor, int]:
    """The sum over all output positions of ``fn``'s untiled output, tile by tile: (C_out,)
    float64 sums and the number of positions (``sum / count`` is a global average pool). Only the
    sums are kept, never the output map. Arguments as for :func:`tiled_apply`."""
    total, count = None, 0
    with torch.inference_mode():
        for _, core in tiled_cores(
            fn,
            reader,
            tile=tile,
            halo=halo,
            stride=stride,
            align=align,
            same_padding=same_padding,
            device=device,
            progress=progress,
        ):
            part = core.to(torch.float64).sum(dim=(1, 2)).cpu()
            total = part if total is None else total + part
            count += core.shape[1] * core.shape[2]
    return total, count


def _tile_outputs(
    fn, reader, tiles, batch_tiles, stride, device, dtype, progress, what
) -> Iterator[tuple[Tile, Tensor]]:
    """(tile, fn's output for its window (C_out, h', w')) for every tile, with a bar over tiles.
    The callers hold inference mode around the loop (a mode entered inside a generator would stay
    on for them if they stopped with an exception)."""
    bar = progress_bar(len(tiles), what, "tile", progress)
    try:
        for group in tile_batches(tiles, batch_tiles):
            batch = _read_batch(reader, group)
            y = fn(batch.to(device=device, dtype=dtype))
            _check_output(y, group, stride)
            yield from zip(group, y, strict=True)
            bar.update(len(group))
    finally:
        bar.close()


def _check_halo_covers_field(fn, channels: int, halo: int, stride: int, device, dtype) -> None:
    field = receptive_field(fn, channels, stride_hint=stride, device=device, dtype=dtype)
    if halo < field.radius:
        raise ValueError(
            f"halo={halo} is smaller than fn's measured receptive-field radius {field.radius}: "
            f"outputs near tile edges would see the tile's artificial border instead of the image; "
            f"use halo={field.halo} (the radius rounded up to a multiple of stride={stride})"
        )


def _read_batch(reader: TileReader, group: list[Tile]) -> Tensor:
    """(len(group), C, h, w) float32 windows; a single tile is not copied again by a stack."""
    regions = [reader.read(t.ya, t.yb, t.xa, t.xb) for t in group]
    return regions[0][None] if len(regions) == 1 else torch.stack(regions)


def _write_core(out: np.ndarray, result: np.ndarray, t: Tile, stride: int) -> None:
    """Crop the halo's share from one tile's output (C_out, h', w') and store its core."""
    (rows, cols), (core_rows, core_cols) = t.output_core(stride)
    out[:, rows, cols] = result[:, core_rows, core_cols]

"""Sliding inference: the anomaly map of a template / inspected pair of any size.

Convention. For a map step t (the encoder's stride 4, or 4 / ``dense``), map cell (i, j) covers
input pixels [i*t, (i+1)*t) x [j*t, (j+1)*t) and holds the network's answer for the window x
window crops of both images *centred on that cell* (for odd window - t the centre is half a pixel
up-left). So the map has ceil(H / t) x ceil(W / t) cells and lines up with the input under the
usual half-pixel bilinear upsampling. Windows that reach past the border see the image padded by
reflection (``padding="reflect"``, default), repeated edge pixels ("replicate") or zeros
("zeros"), identically in both images.

Denser maps (``dense`` = 2 or 4, step 2 or 1 pixel) shift and stitch: the network is run on the
dense² shifted copies of the padded pair and the outputs are interleaved. Every cell is still
exactly the network on its own centred crops; the cost is dense² network passes (4x for step 2,
16x for a per-pixel map).

The whole computation is fully convolutional with output step t and reach r = max(h, window - 1 - h)
pixels (h the left/top part of a window), so :func:`fastad.tiling.tiled_apply` runs it tile by
tile on images larger than memory with ``halo`` = r rounded up to t, and the stitched map equals
the untiled one (:func:`detect_tiled`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_choice, check_int, check_pixel_values
from ..tiling import TileReader, open_reader, tiled_apply
from .network import SiameseNet

__all__ = ["PADDINGS", "MapGeometry", "map_geometry", "score_map", "PairReader", "detect_tiled"]

PADDINGS = ("reflect", "replicate", "zeros")


class MapGeometry:
    """Step, padding and reach of the map of a network with ``window`` and ``stride`` at ``dense``."""

    def __init__(self, window: int, stride: int, dense: int) -> None:
        check_int(dense, "dense", meaning="the map step is stride / dense")
        if stride % dense:
            divisors = [d for d in range(1, stride + 1) if stride % d == 0]
            raise ValueError(
                f"dense must be one of {divisors} (a divisor of the network's stride {stride}), got {dense!r}"
            )
        self.window, self.stride, self.dense = window, stride, dense
        self.step = stride // dense
        self.before = (window - self.step) // 2  # pixels of a cell's window above / left of the cell's first pixel
        self.reach = max(self.before, window - 1 - self.before)
        self.halo = -(-self.reach // self.step) * self.step

    def cells(self, size: int) -> int:
        return -(-size // self.step)

    def pad_after(self, size: int) -> int:
        """Right/bottom padding so that the last cell's window fits."""
        return (self.cells(size) - 1) * self.step - self.before + self.window - size


def map_geometry(net: SiameseNet, dense: int = 1) -> MapGeometry:
    return MapGeometry(net.window, net.stride, dense)


def _pad(x: Tensor, geometry: MapGeometry, padding: str) -> Tensor:
    h, w = x.shape[-2:]
    pads = (geometry.before, geometry.pad_after(w), geometry.before, geometry.pad_after(h))
    if padding == "zeros":
        return F.pad(x, pads)
    if padding == "reflect" and min(h, w) <= max(pads):
        # Reflection needs more pixels than it mirrors. Images are at least a window wide and a
        # tile's window is at least the halo wide, so only a direct call on a tiny input gets here.
        raise ValueError(f"a {h}x{w} input is too small to reflect-pad by {max(pads)} pixels")
    return F.pad(x, pads, mode=padding)


def _batched_scores(
    net: SiameseNet, template: Tensor, inspected: Tensor, geometry: MapGeometry, padding: str
) -> Tensor:
    """(B, C, H, W) pairs -> (B, ceil(H/t), ceil(W/t)) anomaly scores; see the module docstring."""
    b, _, h, w = template.shape
    rows, cols = geometry.cells(h), geometry.cells(w)
    padded = _pad(torch.cat([template, inspected]), geometry, padding)
    out = template.new_empty((b, rows, cols))
    f, t, s, win = geometry.dense, geometry.step, geometry.stride, geometry.window
    for a in range(f):
        n_rows = -(-(rows - a) // f)
        for c in range(f):
            n_cols = -(-(cols - c) // f)
            crop = padded[..., a * t : a * t + (n_rows - 1) * s + win, c * t : c * t + (n_cols - 1) * s + win]
            out[:, a::f, c::f] = net.anomaly(crop[:b], crop[b:])
    return out


def _check_pair(template: object, inspected: object, net: SiameseNet) -> None:
    for name, x in (("template", template), ("inspected", inspected)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (C, H, W) or (B, C, H, W), got {type(x).__name__}")
        if x.dim() not in (3, 4):
            raise ValueError(f"{name} must be (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point in [0, 1], got {x.dtype}")
    if template.shape != inspected.shape:
        raise ValueError(
            f"template and inspected must have the same size, got {tuple(template.shape)} and {tuple(inspected.shape)}"
        )
    c, w = net.config.in_channels, net.window
    if template.shape[-3] != c:
        raise ValueError(f"the network takes {c}-channel images, got shape {tuple(template.shape)}")
    if min(template.shape[-2:]) < w:
        raise ValueError(
            f"images of {template.shape[-2]}x{template.shape[-1]} pixels are smaller than the "
            f"network's {w}x{w} receptive field"
        )


def score_map(
    net: SiameseNet, template: Tensor, inspected: Tensor, *, dense: int = 1, padding: str = "reflect"
) -> Tensor:
    """Anomaly map of a pair held in memory: (C, H, W) -> (ceil(H/t), ceil(W/t)) with t = 4 / dense,
    or batched (B, C, H, W) -> (B, ...). Runs on the network's device under inference mode."""
    _check_pair(template, inspected, net)
    check_choice(padding, "padding", PADDINGS)
    geometry = map_geometry(net, dense)
    single = template.dim() == 3
    if single:
        template, inspected = template[None], inspected[None]
    param = next(net.parameters())
    with torch.inference_mode():
        out = _batched_scores(
            net, template.to(param.device, param.dtype), inspected.to(param.device, param.dtype), geometry, padding
        )
    return out[0] if single else out


class PairReader:
    """Two :class:`~fastad.tiling.TileReader` s of the same size read as one image with the
    channels of both (template first), so the shared tiling reads matching windows of the pair."""

    def __init__(self, template: TileReader, inspected: TileReader) -> None:
        if template.shape[1:] != inspected.shape[1:]:
            raise ValueError(
                f"template and inspected must have the same size, got {template.shape[1]}x"
                f"{template.shape[2]} and {inspected.shape[1]}x{inspected.shape[2]}"
            )
        if template.shape[0] != inspected.shape[0]:
            raise ValueError(f"template has {template.shape[0]} channels, inspected {inspected.shape[0]}")
        self.template, self.inspected = template, inspected

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.template.shape
        return (2 * c, h, w)

    @property
    def dtype(self):
        return self.template.dtype

    def read(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        return torch.cat([self.template.read(y0, y1, x0, x1), self.inspected.read(y0, y1, x0, x1)])


def _pair_function(net: SiameseNet, geometry: MapGeometry, padding: str) -> Callable[[Tensor], Tensor]:
    c = net.config.in_channels

    def fn(pair: Tensor) -> Tensor:
        # Tiles are read lazily, so their values are first seen here: a NaN or a 0..255 float
        # file is refused at the first tile that holds one, before it turns into a plausible map.
        check_pixel_values(pair, "a tile of the template / inspected pair")
        return _batched_scores(net, pair[:, :c], pair[:, c:], geometry, padding)[:, None]

    return fn


def detect_tiled(
    net: SiameseNet,
    template: TileReader | str | os.PathLike | np.ndarray | Tensor,
    inspected: TileReader | str | os.PathLike | np.ndarray | Tensor,
    *,
    tile: int = 1024,
    dense: int = 1,
    padding: str = "reflect",
    out: np.ndarray | None = None,
    progress: bool | None = None,
    batch_tiles: int = 1,
) -> np.ndarray:
    """Anomaly map of a pair read tile by tile (files larger than memory: .npy, uncompressed TIFF,
    or anything :func:`fastad.tiling.open_reader` takes). Returns ``out`` or a new float32 array
    (ceil(H/t), ceil(W/t)); equal to :func:`score_map` on the whole pair up to float rounding.
    Memory: about ``batch_tiles * 2C * (tile + 2 * halo)**2`` input values plus the network's
    activations, whatever the image size. ``tile`` is rounded down to a multiple of the step."""
    check_choice(padding, "padding", PADDINGS)
    geometry = map_geometry(net, dense)
    pair = PairReader(open_reader(template), open_reader(inspected))
    c, h, w = pair.shape
    if c // 2 != net.config.in_channels:
        raise ValueError(f"the network takes {net.config.in_channels}-channel images, the files have {c // 2}")
    if min(h, w) < net.window:
        raise ValueError(
            f"images of {h}x{w} pixels are smaller than the network's {net.window}x{net.window} receptive field"
        )
    check_int(tile, "tile", minimum=geometry.step, meaning="pixels, at least the map step")
    tile -= tile % geometry.step
    if out is not None and out.ndim == 2:
        out = out[None]
    param = next(net.parameters())
    result = tiled_apply(
        _pair_function(net, geometry, padding),
        pair,
        tile=tile,
        halo=geometry.halo,
        stride=geometry.step,
        out=out,
        progress=progress,
        batch_tiles=batch_tiles,
        device=param.device,
        dtype=param.dtype,
    )
    return result[0]

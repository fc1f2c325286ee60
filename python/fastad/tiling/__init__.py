"""Exact tiled inference for images too large for memory.

A fully-convolutional ``fn`` (a feature extractor, a small network) with output stride ``s`` and
receptive-field radius ``r`` (input pixels) is run tile by tile over a lazily read image, and the
stitched result *equals* the untiled call ``fn(image[None])[0]`` up to floating-point rounding.

Output-size convention: for an input of H x W pixels, ``fn`` must return ceil(H/s) x ceil(W/s)
positions, output (i, j) being "at" input pixel (i*s, j*s) and depending only on input pixels
within ``r`` of it (Chebyshev distance). That is what convolutions with ``padding = dilation *
(kernel - 1) // 2`` (odd kernels), stride-2 convs with padding 1, and ``MaxPool2d(3, 2, 1)`` or
``MaxPool2d(2, 2, ceil_mode=True)`` give; valid (unpadded) convolutions or floor-mode pooling on
odd sizes do not, and :func:`tiled_apply` raises when a tile's output size breaks the rule.

Why tiles are *cropped* at the image border rather than zero-padded: the untiled network pads
every layer's input with zeros, not only the image. Zero-padding the image and running a tile
would give the first layer's bias and activations where the untiled call sees zeros in deeper
layers, so border values would differ. A tile's read window is therefore clipped to the image,
``fn`` pads it exactly as the untiled call pads the image, and the halo only has to absorb the
artificial edges between tiles. Window origins stay multiples of ``s`` so every strided layer
samples the same grid as in the untiled call.

Readers (:class:`TileReader`) give (C, h, w) float32 regions without loading the whole image; the
file readers map the file only for the duration of one read, so pages read do not accumulate in
the process's resident memory.

The package's modules: ``readers`` (lazy regions), ``plan`` (tiles and the argument checks),
``apply`` (the tiled calls) and ``receptive_field`` (the probe that gives the halo).
"""

from .apply import tile_windows, tiled_apply, tiled_cores, tiled_sum
from .readers import ArrayReader, NpyReader, TiffReader, TileReader, open_reader
from .receptive_field import ReceptiveField, receptive_field

__all__ = [
    "TileReader",
    "ArrayReader",
    "NpyReader",
    "TiffReader",
    "open_reader",
    "tiled_apply",
    "tiled_sum",
    "tiled_cores",
    "tile_windows",
    "ReceptiveField",
    "receptive_field",
]

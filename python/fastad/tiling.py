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
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ._progress import progress_bar

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


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


@runtime_checkable
class TileReader(Protocol):
    """Anything that gives regions of a (C, H, W) image on demand.

    ``shape`` is (C, H, W); ``dtype`` the stored element type; ``read(y0, y1, x0, x1)`` returns
    rows y0..y1-1 and columns x0..x1-1 as a (C, y1-y0, x1-x0) float32 tensor, integer images
    scaled by their type's maximum (uint8 / 255, uint16 / 65535: values in [0, 1]).
    """

    @property
    def shape(self) -> tuple[int, int, int]: ...

    @property
    def dtype(self) -> np.dtype | torch.dtype: ...

    def read(self, y0: int, y1: int, x0: int, x1: int) -> Tensor: ...


_Kind = Literal["hw", "hwc", "chw"]
_MAX_INFERRED_CHANNELS = 4  # gray, gray+alpha, RGB, RGBA: more bands need channels_last given


def _layout_of(shape: tuple[int, ...], channels_last: bool | None, what: str) -> _Kind:
    """Which axes of a 2-D or 3-D array are rows, columns and channels."""
    if len(shape) == 2:
        return "hw"
    if len(shape) != 3:
        raise ValueError(f"{what} must be 2-D (H, W) or 3-D (H, W, C) / (C, H, W), got shape {shape}")
    if channels_last is not None:
        return "hwc" if channels_last else "chw"
    first, last = shape[0], shape[-1]
    if last <= _MAX_INFERRED_CHANNELS < first:
        return "hwc"
    if first <= _MAX_INFERRED_CHANNELS < last:
        return "chw"
    raise ValueError(
        f"{what} has shape {shape}: cannot tell whether it is (H, W, C) or (C, H, W) (the channel "
        f"axis is inferred only when exactly one of the first and last axes has at most "
        f"{_MAX_INFERRED_CHANNELS} entries); pass channels_last=True or channels_last=False"
    )


def _chw_shape(shape: tuple[int, ...], kind: _Kind) -> tuple[int, int, int]:
    if kind == "hw":
        return (1, shape[0], shape[1])
    if kind == "hwc":
        return (shape[2], shape[0], shape[1])
    return (shape[0], shape[1], shape[2])


def _region_index(kind: _Kind, y0: int, y1: int, x0: int, x1: int) -> tuple[slice, ...]:
    rows, cols = slice(y0, y1), slice(x0, x1)
    if kind == "chw":
        return (slice(None), rows, cols)
    return (rows, cols)


def _check_region(shape: tuple[int, int, int], y0: int, y1: int, x0: int, x1: int) -> None:
    _, h, w = shape
    for name, v in (("y0", y0), ("y1", y1), ("x0", x0), ("x1", x1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"read(): {name} must be an int, got {type(v).__name__}")
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ValueError(
            f"read(): region rows [{y0}, {y1}) x columns [{x0}, {x1}) is empty or outside the "
            f"image of H={h}, W={w} (need 0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W)"
        )


def _check_numeric_dtype(dtype: np.dtype, what: str) -> None:
    if not (dtype == np.bool_ or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise TypeError(f"{what} has dtype {dtype}; expected a bool, integer or floating-point image")


def _numpy_region_to_tensor(region: np.ndarray, kind: _Kind) -> Tensor:
    """(h, w) / (h, w, C) / (C, h, w) numpy region -> (C, h, w) float32, integers scaled to [0, 1]."""
    if kind == "hw":
        region = region[None]
    elif kind == "hwc":
        region = region.transpose(2, 0, 1)
    if np.issubdtype(region.dtype, np.integer):
        scaled = np.array(region, dtype=np.float32, order="C")
        scaled /= np.float32(np.iinfo(region.dtype).max)
    else:  # bool or floating point; astype also undoes a big-endian byte order
        scaled = np.ascontiguousarray(region, dtype=np.float32)
    return torch.from_numpy(scaled)


def _tensor_region_to_tensor(region: Tensor, kind: _Kind) -> Tensor:
    if kind == "hw":
        region = region[None]
    elif kind == "hwc":
        region = region.permute(2, 0, 1)
    if region.dtype.is_floating_point:
        return region.to(torch.float32).contiguous()
    if region.dtype == torch.bool:
        return region.to(torch.float32).contiguous()
    return (region.to(torch.float32) / float(torch.iinfo(region.dtype).max)).contiguous()


class ArrayReader:
    """Regions of an in-memory array, an ``np.memmap`` or a torch tensor.

    Accepted layouts: (H, W) (one channel), (H, W, C) and (C, H, W). For 3-D input, pass
    ``channels_last=True`` for (H, W, C) or ``False`` for (C, H, W); left as ``None`` it is
    inferred only when unambiguous: (H, W, C) when the last axis has at most 4 entries and the
    first more, (C, H, W) the other way round; anything else raises (e.g. 12-band images must
    say which). ``channels_last`` is ignored for 2-D input.

    Regions are returned on the array's device (CPU for numpy). A user-made ``np.memmap`` keeps
    the pages it has read mapped (they count in resident memory, though the kernel can drop them);
    use :class:`NpyReader` for a bounded footprint.
    """

    def __init__(self, array: np.ndarray | Tensor, *, channels_last: bool | None = None) -> None:
        if isinstance(array, Tensor):
            if array.dtype.is_complex:
                raise TypeError(f"array has dtype {array.dtype}; expected a real-valued image")
        elif isinstance(array, np.ndarray):
            _check_numeric_dtype(array.dtype, "array")
        else:
            raise TypeError(f"array must be a numpy array, np.memmap or torch.Tensor, got {type(array).__name__}")
        self._kind = _layout_of(tuple(array.shape), channels_last, "array")
        self._array = array
        self._shape = _chw_shape(tuple(array.shape), self._kind)
        if min(self._shape) < 1:
            raise ValueError(f"array has an empty axis: shape {tuple(array.shape)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return self._shape

    @property
    def dtype(self) -> np.dtype | torch.dtype:
        """Stored element type: an ``np.dtype`` for numpy input, a ``torch.dtype`` for tensors."""
        return self._array.dtype

    def read(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        """Rows [y0, y1) x columns [x0, x1) as (C, y1-y0, x1-x0) float32."""
        _check_region(self._shape, y0, y1, x0, x1)
        region = self._array[_region_index(self._kind, y0, y1, x0, x1)]
        if isinstance(region, Tensor):
            return _tensor_region_to_tensor(region, self._kind)
        return _numpy_region_to_tensor(region, self._kind)


class _MappedFileArray:
    """A raw array stored at ``offset`` in a file, mapped only while one region is copied out.

    Mapping per read (instead of holding an ``np.memmap``) keeps the pages already read out of
    the process's resident set: after the region is copied the mapping is closed, so resident
    memory stays at about one region however much of the file has been read.
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype, order: str) -> None:
        self.path, self.offset, self.shape, self.dtype, self.order = path, offset, shape, dtype, order
        self.nbytes = math.prod(shape) * dtype.itemsize
        size = path.stat().st_size
        if size < offset + self.nbytes:
            raise ValueError(
                f"{path} is truncated: its {shape} {dtype} pixels need {offset + self.nbytes} bytes, "
                f"the file has {size}"
            )

    def copy_region(self, index: tuple[slice, ...]) -> np.ndarray:
        start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be aligned
        with (
            open(self.path, "rb") as f,
            mmap.mmap(
                f.fileno(), length=self.offset - start + self.nbytes, access=mmap.ACCESS_READ, offset=start
            ) as mapped,
        ):
            whole = np.ndarray(self.shape, self.dtype, buffer=mapped, offset=self.offset - start, order=self.order)
            region = np.array(whole[index])  # a copy: the mapping closes below
            del whole  # release the buffer export so the mapping can close
        return region


class _FileReader:
    """Common part of the file readers: layout bookkeeping over a :class:`_MappedFileArray`."""

    _data: _MappedFileArray
    _kind: _Kind
    _shape: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        """Stored element type (with the file's byte order)."""
        return self._data.dtype

    @property
    def path(self) -> Path:
        return self._data.path

    def read(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        """Rows [y0, y1) x columns [x0, x1) as (C, y1-y0, x1-x0) float32."""
        _check_region(self._shape, y0, y1, x0, x1)
        region = self._data.copy_region(_region_index(self._kind, y0, y1, x0, x1))
        return _numpy_region_to_tensor(region, self._kind)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, shape={self._shape}, dtype={self.dtype})"


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no such file: {p}")
    return p


class NpyReader(_FileReader):
    """Regions of a ``.npy`` file, read lazily.

    The header is read with ``np.load(path, mmap_mode="r")``; each :meth:`read` maps the file,
    copies the region and unmaps it. Layouts and ``channels_last`` as in :class:`ArrayReader`;
    C- and Fortran-ordered files both work (C order with rows outermost reads fastest).
    """

    def __init__(self, path: str | os.PathLike, *, channels_last: bool | None = None) -> None:
        p = _existing_file(path, "NpyReader")
        try:
            header = np.load(p, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise ValueError(f"NpyReader: cannot map {p} as a .npy array: {exc}") from exc
        if not isinstance(header, np.memmap):
            raise ValueError(f"NpyReader: {p} is not a single .npy array (an .npz archive?)")
        shape, dtype, offset = tuple(header.shape), header.dtype, int(header.offset)
        order = "F" if header.flags.f_contiguous and not header.flags.c_contiguous else "C"
        del header  # only its metadata is kept; reads map the file anew
        _check_numeric_dtype(dtype, str(p))
        self._kind = _layout_of(shape, channels_last, str(p))
        self._shape = _chw_shape(shape, self._kind)
        if min(self._shape) < 1:
            raise ValueError(f"NpyReader: {p} has an empty axis: shape {shape}")
        self._data = _MappedFileArray(p, offset, shape, dtype, order)


_CONVERT_HINT = (
    "convert it once to a .npy file (numpy.lib.format.open_memmap, filled in blocks) or to an "
    "uncompressed, untiled TIFF (tifffile.imwrite(path, data) without compression or tile=)"
)


def _import_tifffile():
    try:
        import tifffile  # lazy: only TIFF users pay for it
    except ImportError as exc:  # pragma: no cover - it ships with scikit-image
        raise ImportError("TiffReader needs tifffile (installed with scikit-image): pip install tifffile") from exc
    return tifffile


class TiffReader(_FileReader):
    """Regions of an uncompressed TIFF whose pixels are stored contiguously, read lazily.

    tifffile locates the pixels (the same offset, shape and byte order that ``tifffile.memmap``
    maps); each :meth:`read` maps the file, copies the region and unmaps it. The series' axes say
    the layout: ``YX`` (one channel), ``YXS``/``YXC`` (channels last, interleaved RGB) or one
    leading axis before ``YX`` (``SYX`` planar RGB, ``CYX``, ``QYX`` multi-page bands).

    Compressed, tiled or scattered-strip TIFFs would need the whole image decoded for any region,
    so they raise a ValueError that says how to convert them.
    """

    def __init__(self, path: str | os.PathLike, *, series: int = 0) -> None:
        p = _existing_file(path, "TiffReader")
        series = _positive_int(series, "series", 0)
        tifffile = _import_tifffile()
        try:
            tif = tifffile.TiffFile(p)
        except Exception as exc:  # tifffile raises its own TiffFileError and others
            raise ValueError(f"TiffReader: cannot parse {p} as a TIFF: {exc}") from exc
        with tif:
            if not 0 <= series < len(tif.series):
                raise ValueError(f"TiffReader: {p} has {len(tif.series)} image series, series={series} asked")
            s = tif.series[series]
            page = s.keyframe
            offset = s.dataoffset
            shape, axes = tuple(int(n) for n in s.shape), s.axes
            dtype = np.dtype(tif.byteorder + s.dtype.char)
            if offset is None:
                raise ValueError(f"TiffReader cannot read {p} lazily: {_why_not_contiguous(page)}; {_CONVERT_HINT}")
        _check_numeric_dtype(dtype, str(p))
        self._kind = _tiff_layout(axes, shape, p)
        self._shape = _chw_shape(shape, self._kind)
        self._data = _MappedFileArray(p, int(offset), shape, dtype, "C")


def _why_not_contiguous(page) -> str:
    compression = int(page.compression)
    if compression != 1:
        name = getattr(page.compression, "name", str(compression))
        return f"it is compressed ({name}), so any region needs its strips or tiles decoded"
    if page.is_tiled:
        return "its pixels are stored in TIFF tiles, not as one contiguous block"
    return "its strips or pages are not stored as one contiguous block"


def _tiff_layout(axes: str, shape: tuple[int, ...], path: Path) -> _Kind:
    if axes == "YX":
        return "hw"
    if len(axes) == 3 and axes[:2] == "YX" and axes[2] in "SC":
        return "hwc"
    if len(axes) == 3 and axes[1:] == "YX":
        return "chw"
    raise ValueError(
        f"TiffReader: {path} has axes {axes!r} (shape {shape}); expected YX, YXS/YXC or one "
        f"channel axis before YX (e.g. SYX, CYX, QYX); {_CONVERT_HINT}"
    )


def open_reader(
    source: str | os.PathLike | np.ndarray | Tensor | TileReader, *, channels_last: bool | None = None
) -> TileReader:
    """A reader for ``source``: a ``.npy`` or ``.tif``/``.tiff`` path, an array, or a reader.

    ``channels_last`` is passed to :class:`ArrayReader` / :class:`NpyReader` (TIFFs say their
    layout themselves); an object that already satisfies :class:`TileReader` is returned as is.
    """
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        suffix = p.suffix.lower()
        if suffix == ".npy":
            return NpyReader(p, channels_last=channels_last)
        if suffix in (".tif", ".tiff"):
            return TiffReader(p)
        raise ValueError(f"open_reader: {p} has extension {p.suffix!r}; supported: .npy, .tif, .tiff")
    if isinstance(source, (np.ndarray, Tensor)):
        return ArrayReader(source, channels_last=channels_last)
    if isinstance(source, TileReader):
        return source
    raise TypeError(
        "open_reader: expected a path (.npy/.tif/.tiff), a numpy array, a torch tensor or a "
        f"TileReader, got {type(source).__name__}"
    )


# --------------------------------------------------------------------------------------------
# Tiled application
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tile:
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


def _axis_spans(length: int, tile: int, halo: int, residue_of: int = 0) -> list[tuple[int, int, int, int]]:
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


def _plan_tiles(height: int, width: int, tile: int, halo: int, residue_of: int = 0) -> list[_Tile]:
    rows, cols = _axis_spans(height, tile, halo, residue_of), _axis_spans(width, tile, halo, residue_of)
    return [_Tile(y0, y1, x0, x1, ya, yb, xa, xb) for (y0, y1, ya, yb) in rows for (x0, x1, xa, xb) in cols]


def _batches(tiles: list[_Tile], batch_tiles: int) -> Iterator[list[_Tile]]:
    """Groups of at most ``batch_tiles`` tiles of equal window size, in row-major order.

    Windows clipped at the image border are smaller, so tiles are bucketed by window size; a
    bucket is emitted as soon as it is full, so only tile *descriptions* wait, never pixels.
    """
    pending: dict[tuple[int, int], list[_Tile]] = {}
    for t in tiles:
        bucket = pending.setdefault(t.window_shape(), [])
        bucket.append(t)
        if len(bucket) == batch_tiles:
            yield pending.pop(t.window_shape())
    yield from pending.values()


def _positive_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_tiling_args(tile, halo, stride, batch_tiles, align=None) -> tuple[int, int, int, int, int]:
    stride = _positive_int(stride, "stride", 1)
    align = stride if align is None else _positive_int(align, "align", 1)
    tile = _positive_int(tile, "tile", 1)
    halo = _positive_int(halo, "halo", 0)
    batch_tiles = _positive_int(batch_tiles, "batch_tiles", 1)
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


def _numpy_dtype_for(dtype: torch.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == torch.float64 else np.dtype(np.float32)


def _check_output(y, tiles: list[_Tile], stride: int) -> None:
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
    device, probed_dtype = _probe_placement(fn, device, None)
    if dtype is None:
        dtype = probed_dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    tile, halo, stride, batch_tiles, align = _check_tiling_args(tile, halo, stride, batch_tiles, align)
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

    tiles = _plan_tiles(height, width, tile, halo, align if same_padding else 0)
    with torch.inference_mode():
        for t, y in _tile_outputs(fn, reader, tiles, batch_tiles, stride, device, dtype, progress, "tiled_apply"):
            if out is None:
                out = np.empty((y.shape[0], *out_hw), dtype=_numpy_dtype_for(y.dtype))
            elif out.shape[0] != y.shape[0]:
                raise ValueError(f"out has {out.shape[0]} channels but fn returns {y.shape[0]}")
            host = y.to("cpu", dtype=torch.float64 if y.dtype == torch.float64 else torch.float32).numpy()
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
    tile, halo, _, _, align = _check_tiling_args(tile, halo, 1, 1, align)
    reader = open_reader(reader)
    _, height, width = reader.shape
    tiles = _plan_tiles(height, width, tile, halo, align if same_padding else 0)
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
    device, dtype = _probe_placement(fn, device, None)
    tile, halo, stride, _, align = _check_tiling_args(tile, halo, stride, 1, align)
    reader = open_reader(reader)
    _, height, width = reader.shape
    tiles = _plan_tiles(height, width, tile, halo, align if same_padding else 0)
    if part is not None:
        from .distributed import shard

        block = shard(len(tiles), *part)
        tiles = tiles[block.start : block.stop]
    for t, y in _tile_outputs(fn, reader, tiles, 1, stride, device, dtype, progress, "tiled_cores"):
        cy, cx = (t.y0 - t.ya) // stride, (t.x0 - t.xa) // stride
        oh, ow = -(-t.y1 // stride) - t.y0 // stride, -(-t.x1 // stride) - t.x0 // stride
        yield (t.y0 // stride, t.x0 // stride), y[:, cy : cy + oh, cx : cx + ow]


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
) -> Iterator[tuple[_Tile, Tensor]]:
    """(tile, fn's output for its window (C_out, h', w')) for every tile, with a bar over tiles.
    The callers hold inference mode around the loop (a mode entered inside a generator would stay
    on for them if they stopped with an exception)."""
    bar = progress_bar(len(tiles), what, "tile", progress)
    try:
        for group in _batches(tiles, batch_tiles):
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


def _read_batch(reader: TileReader, group: list[_Tile]) -> Tensor:
    """(len(group), C, h, w) float32 windows; a single tile is not copied again by a stack."""
    regions = [reader.read(t.ya, t.yb, t.xa, t.xb) for t in group]
    return regions[0][None] if len(regions) == 1 else torch.stack(regions)


def _write_core(out: np.ndarray, result: np.ndarray, t: _Tile, stride: int) -> None:
    """Crop the halo's share from one tile's output (C_out, h', w') and store its core."""
    oy0, ox0 = t.y0 // stride, t.x0 // stride
    oy1, ox1 = -(-t.y1 // stride), -(-t.x1 // stride)
    cy, cx = (t.y0 - t.ya) // stride, (t.x0 - t.xa) // stride
    out[:, oy0:oy1, ox0:ox1] = result[:, cy : cy + oy1 - oy0, cx : cx + ox1 - ox0]


# --------------------------------------------------------------------------------------------
# Receptive field
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceptiveField:
    """Measured reach of a fully-convolutional function.

    ``radius``: input pixels (Chebyshev distance) around (i*s, j*s) that output (i, j) was seen
    to depend on; ``stride``: output stride s; ``halo``: the smallest valid ``halo`` for
    :func:`tiled_apply` (radius rounded up to a multiple of s); ``probe_size``: side of the
    square input the measurement used.
    """

    radius: int
    stride: int
    halo: int
    probe_size: int


def receptive_field(
    fn_or_module: Callable[[Tensor], Tensor],
    channels: int,
    stride_hint: int | None = None,
    *,
    size: int = 64,
    max_size: int = 2048,
    trials: int = 2,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ReceptiveField:
    """Measure how far an output of ``fn_or_module`` reaches into its input (a check, not a proof).

    Method (perturbation test): on a random (1, channels, N, N) input, take the output position
    nearest the centre, (c, c) at input pixel p = c*s, and replace every input pixel farther
    than rho from p (Chebyshev) with other random values. The radius is the smallest rho for
    which that output does not change, found by bisection (monotone: a larger rho perturbs a
    subset). A random base rather than a zero input is used because on zeros a ReLU after a
    negative bias hides every dependence. The probe grows (N doubles) while the field reaches
    its border.

    It is empirical: a dependence invisible at the probed inputs (units dead for both draws,
    ties in max-pooling, data-dependent branches) is missed, and comparisons are exact, so a
    ``fn`` whose arithmetic mixes far pixels at rounding level (FFT convolution) looks global.
    Use it to choose or double-check ``halo``, and keep a margin for unseen inputs.

    Args:
        fn_or_module: callable on (1, channels, N, N); a module should be in eval mode
            (BatchNorm in training mode couples all pixels). It is not modified.
        channels: input channels C.
        stride_hint: the expected output stride; ``None`` infers it from the output size.
        size, max_size: first and largest probe side N.
        trials: independent random draws; the largest radius is kept.
        seed: seed of the random draws.
        device, dtype: of the probe; default to the module's first parameter, else CPU float32.

    Returns:
        :class:`ReceptiveField`.
    """
    if not callable(fn_or_module):
        raise TypeError(f"fn_or_module must be callable, got {type(fn_or_module).__name__}")
    channels = _positive_int(channels, "channels", 1)
    trials = _positive_int(trials, "trials", 1)
    size = _positive_int(size, "size", 2)
    max_size = _positive_int(max_size, "max_size", size)
    if stride_hint is not None:
        stride_hint = _positive_int(stride_hint, "stride_hint", 1)
    device, dtype = _probe_placement(fn_or_module, device, dtype)
    gen = torch.Generator().manual_seed(seed)

    n = size
    while True:
        found = _probe(fn_or_module, channels, n, stride_hint, trials, gen, device, dtype)
        if found is not None:
            radius, stride = found
            return ReceptiveField(radius, stride, -(-radius // stride) * stride, n)
        if n * 2 > max_size:
            raise ValueError(
                f"receptive_field: the output still depends on the border of a {n}x{n} probe; the "
                f"field is larger than max_size={max_size} allows, or global (global pooling, "
                f"attention, BatchNorm in training mode)"
            )
        n *= 2


def _probe_placement(fn, device, dtype) -> tuple[torch.device, torch.dtype]:
    param = None
    if isinstance(fn, torch.nn.Module):
        param = next(iter(fn.parameters()), None)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    if dtype is None:
        dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    return torch.device(device), dtype


def _probe(fn, channels, n, stride_hint, trials, gen, device, dtype) -> tuple[int, int] | None:
    """(radius, stride) from an n x n probe, or None when the field reaches the probe's border."""
    radius, stride = 0, None
    with torch.inference_mode():
        for _ in range(trials):
            base = torch.rand((1, channels, n, n), generator=gen, dtype=torch.float64)
            other = torch.rand((1, channels, n, n), generator=gen, dtype=torch.float64)
            base, other = base.to(device=device, dtype=dtype), other.to(device=device, dtype=dtype)
            y = fn(base)
            if stride is None:
                stride = _stride_from_output(y, n, stride_hint)
            c = (y.shape[-2] // 2, y.shape[-1] // 2)
            py, px = c[0] * stride, c[1] * stride
            reference = y[..., c[0], c[1]]
            rows = torch.arange(n, device=device).view(n, 1)
            cols = torch.arange(n, device=device).view(1, n)
            distance = torch.maximum((rows - py).abs(), (cols - px).abs())

            # changes is called only within this iteration: the loop variables it reads are current.
            def changes(rho: int) -> bool:
                probe = torch.where(distance > rho, other, base)  # noqa: B023
                return not torch.equal(fn(probe)[..., c[0], c[1]], reference)  # noqa: B023

            border = min(py, px, n - 1 - py, n - 1 - px)
            if not changes(-1):
                raise ValueError(
                    "receptive_field: the centre output did not change when the whole input was "
                    "replaced; it does not depend on the input (or every unit was inactive)"
                )
            if changes(border - 1):
                return None  # the field reaches the probe's outer ring, maybe beyond: probe larger
            lo, hi = -1, border - 1  # changes(lo) is True, changes(hi) is False
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if changes(mid):
                    lo = mid
                else:
                    hi = mid
            radius = max(radius, hi)
    return radius, stride


def _stride_from_output(y, n: int, stride_hint: int | None) -> int:
    if not isinstance(y, Tensor) or y.dim() != 4:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"receptive_field: fn must return a 4-D (N, C_out, h, w) tensor, got {got}")
    h, w = y.shape[-2:]
    if h != w:
        raise ValueError(f"receptive_field: a square {n}x{n} probe gave a non-square {h}x{w} output")
    stride = stride_hint if stride_hint is not None else max(1, round(n / h))
    if -(-n // stride) != h:
        hint = f"stride_hint={stride_hint}" if stride_hint is not None else f"inferred stride {stride}"
        raise ValueError(
            f"receptive_field: a {n}x{n} input gave a {h}x{w} output, not ceil({n}/s) with {hint}; "
            f"fn does not follow the output-size convention of tiled_apply"
        )
    return stride

"""Lazy readers of large images: regions (C, h, w) as float32 tensors without loading the whole
image (arrays, tensors, .npy and TIFF files mapped for one read at a time)."""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ..checks import check_int


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
        series = check_int(series, "series", minimum=0)
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

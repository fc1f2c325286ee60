"""GeoTIFF in and out for high-resolution scenes, with rasterio (``pip install fastad[geo]``).

* :class:`RasterReader` reads any raster rasterio opens (GeoTIFF, Cloud-Optimised GeoTIFF, BigTIFF,
  also plain TIFF, PNG and JPEG) window by window, as a :class:`fastad.tiling.TileReader`: only
  the windows asked for are decoded, so a scene never has to fit in memory. It also reports
  which pixels hold data (the raster's nodata value, alpha band or mask).
* :class:`MapWriter` receives an anomaly map band of rows after band of rows (what
  :func:`fastad.highres.predict_large` produces) and writes it as a float32 GeoTIFF carrying the
  input's CRS and geotransform, tiled and compressed, NaN where the input had no data, together
  with a PNG quick-look reduced by block maximum (a small defect stays visible at any reduction).
  Both files appear only complete: they are written under temporary names and renamed at the end.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import viz
from .checks import check_positive_float

__all__ = ["RasterReader", "MapWriter", "block_max", "gdal_cache"]

# Pixel values are scaled to [0, 1] by the largest value of their integer type (what predict
# takes from an 8-bit image); float rasters are taken as they are.
_INTEGER_SCALES = {"uint8": 255.0, "uint16": 65535.0, "int16": 32767.0, "uint32": 4294967295.0, "int32": 2147483647.0}


def _rasterio():
    try:
        import rasterio
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading and writing GeoTIFFs needs rasterio: pip install 'fastad[geo]' (or pip install rasterio)"
        ) from exc
    return rasterio


def gdal_cache(megabytes: int = 256):
    """A ``rasterio.Env`` that caps GDAL's block cache, to wrap a run that reads and writes large
    rasters. GDAL keeps decoded and not yet written blocks in it, up to 5 % of the machine's
    memory by default (1.2 GB here), which a 20,000-px scene fills: with the cap a scene's
    memory stays bounded by the tile, not by the machine."""
    return _rasterio().Env(GDAL_CACHEMAX=int(megabytes) * 2**20)


class RasterReader:
    """A raster file read window by window as (3, h, w) float32 tensors in [0, 1].

    Args:
        path: any file rasterio (GDAL) opens.
        bands: the three 1-based band numbers to use as R, G, B; ``None``: bands 1-3 of a 3- or
            4-band raster (a 4th is alpha), band 1 three times for a single-band one. Rasters with
            other band counts must say which three.
        scale: divides the values; ``None``: the largest value of an integer type (255 for uint8,
            65535 for uint16), 1 for float rasters.

    ``crs``, ``transform`` and ``profile`` are the raster's; :meth:`valid` says which pixels hold
    data. Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self, path: str | os.PathLike, *, bands: tuple[int, int, int] | None = None, scale: float | None = None
    ) -> None:
        rasterio = _rasterio()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such image file: {self.path}")
        import warnings

        try:
            with warnings.catch_warnings():
                # A PNG or JPEG has no georeference; that is not a mistake.
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self._ds = rasterio.open(self.path)
        except rasterio.errors.RasterioIOError as exc:
            raise ValueError(f"{self.path} is not a raster image rasterio can read ({exc})") from None
        ds = self._ds
        if bands is None:
            if ds.count == 1:
                bands = (1, 1, 1)
            elif ds.count in (3, 4):
                bands = (1, 2, 3)
            else:
                self.close()
                raise ValueError(
                    f"{self.path} has {ds.count} bands; say which three to use as R, G, B (bands=(r, g, b))"
                )
        bands = tuple(int(b) for b in bands)
        if len(bands) != 3 or not all(1 <= b <= ds.count for b in bands):
            self.close()
            raise ValueError(f"bands must be three band numbers in 1..{ds.count} of {self.path}, got {bands}")
        dtypes = {ds.dtypes[b - 1] for b in bands}
        if len(dtypes) != 1:
            self.close()
            raise ValueError(f"the bands {bands} of {self.path} have different types {sorted(dtypes)}")
        dtype = dtypes.pop()
        if scale is None:
            if dtype in _INTEGER_SCALES:
                scale = _INTEGER_SCALES[dtype]
            elif dtype.startswith("float"):
                scale = 1.0
            else:
                self.close()
                raise ValueError(f"{self.path} holds {dtype} values; give scale= to bring them to [0, 1]")
        try:
            scale = check_positive_float(scale, "scale")
        except (TypeError, ValueError):
            self.close()
            raise
        self.bands, self.scale, self.dtype = bands, float(scale), np.dtype(np.float32)
        self.shape = (3, ds.height, ds.width)

    @property
    def crs(self):
        return self._ds.crs

    @property
    def transform(self):
        return self._ds.transform

    @property
    def profile(self) -> dict[str, Any]:
        return dict(self._ds.profile)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        from rasterio.windows import Window

        values = self._ds.read(list(self.bands), window=Window(x0, y0, x1 - x0, y1 - y0), out_dtype="float32")
        values /= self.scale
        return torch.from_numpy(values)

    def valid(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """(h, w) bool: True where the raster holds data (GDAL's dataset mask: nodata value,
        alpha band or internal mask; everything when it has none)."""
        from rasterio.windows import Window

        return self._ds.dataset_mask(window=Window(x0, y0, x1 - x0, y1 - y0)) > 0

    def close(self) -> None:
        self._ds.close()

    def __enter__(self) -> RasterReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RasterReader({str(self.path)!r}, shape={self.shape}, bands={self.bands}, scale={self.scale:g})"


def block_max(rows: np.ndarray, factor: int) -> np.ndarray:
    """(n, W) -> (n, ceil(W / factor)): the largest value of each run of ``factor`` columns,
    ignoring NaN (NaN where a run holds nothing else)."""
    n, width = rows.shape
    padded = np.full((n, -(-width // factor) * factor), np.nan, dtype=np.float32)
    padded[:, :width] = rows
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN runs
            return np.nanmax(padded.reshape(n, -1, factor), axis=2)


class MapWriter:
    """Writes an (H, W) anomaly map, band of rows by band of rows, as a GeoTIFF and a quick-look.

    Args:
        path: the GeoTIFF to write (float32, tiled 512 x 512, DEFLATE with the floating-point
            predictor, BigTIFF when needed, nodata NaN).
        height, width: the map's size, the input's.
        like: a :class:`RasterReader` whose CRS and geotransform the map takes (None: none).
        quicklook: PNG path for an 8-bit picture of the map reduced by block maximum to at most
            ``quicklook_side`` pixels a side, scaled from 0 to the map's largest value; None: none.

    Rows must be written in order, each once (:meth:`write`); :meth:`close` with ``ok=True``
    renames both files into place, otherwise (or on an exception inside ``with``) removes them.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        height: int,
        width: int,
        *,
        like: RasterReader | None = None,
        quicklook: str | os.PathLike | None = None,
        quicklook_side: int = 2048,
    ) -> None:
        rasterio = _rasterio()
        self.path = Path(path)
        self.quicklook = None if quicklook is None else Path(quicklook)
        self.shape = (int(height), int(width))
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        profile = {
            "driver": "GTiff",
            "dtype": "float32",
            "count": 1,
            "height": height,
            "width": width,
            "tiled": True,
            "blockxsize": 512,
            "blockysize": 512,
            "compress": "deflate",
            "predictor": 3,
            "nodata": float("nan"),
            "BIGTIFF": "IF_SAFER",
        }
        if like is not None and like.crs is not None:
            profile["crs"] = like.crs
        if like is not None and (like.crs is not None or not like.transform.is_identity):
            profile["transform"] = like.transform
        import warnings

        with warnings.catch_warnings():
            # A map of an image without georeference has none either; that is not a mistake.
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self._ds = rasterio.open(self._tmp, "w", **profile)
        self._next_row = 0
        self._factor = max(1, -(-max(height, width) // int(quicklook_side)))
        self._small = np.full((-(-height // self._factor), -(-width // self._factor)), np.nan, dtype=np.float32)

    def write(self, y0: int, rows: np.ndarray) -> None:
        from rasterio.windows import Window

        rows = np.asarray(rows, dtype=np.float32)
        if (
            y0 != self._next_row
            or rows.ndim != 2
            or rows.shape[1] != self.shape[1]
            or y0 + rows.shape[0] > self.shape[0]
        ):
            raise ValueError(
                f"rows must come in order as (n, {self.shape[1]}) bands; expected row {self._next_row}, "
                f"got {rows.shape} at row {y0}"
            )
        self._ds.write(rows, 1, window=Window(0, y0, self.shape[1], rows.shape[0]))
        reduced = block_max(rows, self._factor)
        np.fmax.at(self._small, np.arange(y0, y0 + rows.shape[0]) // self._factor, reduced)
        self._next_row += rows.shape[0]

    def close(self, ok: bool = True) -> None:
        """Finishes the GeoTIFF (flushing its last blocks) and renames it into place, then writes
        the quick-look; on any failure, or with ``ok=False``, the temporary file is removed."""
        try:
            self._ds.close()
            if ok and self._next_row != self.shape[0]:
                raise ValueError(f"{self.path}: only {self._next_row} of {self.shape[0]} rows were written")
            if ok:
                os.replace(self._tmp, self.path)
        finally:
            self._tmp.unlink(missing_ok=True)
        if ok and self.quicklook is not None:
            top = float(np.nanmax(self._small)) if np.isfinite(self._small).any() else 0.0
            picture = np.nan_to_num(self._small / top if top > 0 else np.zeros_like(self._small), nan=0.0)
            viz.save_png(self.quicklook, (np.clip(picture, 0, 1) * 255 + 0.5).astype(np.uint8))

    def __enter__(self) -> MapWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(ok=exc_type is None)

"""Native-resolution prediction: an image of any size scored tile by tile, equal to the untiled call.

``predict_large(model, image, tile=1024)`` scores a whole scene at its own resolution, reading it
tile by tile (``fastad.tiling``), for the methods whose patch scores do not depend on where a patch
sits (PatchCore, SPADE and MLF-SC; see each method's ``tile_geometry``). Two passes (three for SPADE,
whose first pools its deepest layer over the whole image to choose its gallery, and for MLF-SC,
whose first sums each channel over the whole image for its standardisation):

1. **Patch level.** The method's patch outputs (PatchCore: each patch's distance to the bank and
   the index of its nearest bank patch) are computed with :func:`fastad.tiling.tiled_apply` at the
   map's stride (8 for PatchCore's default layers). Window origins are multiples of the deepest
   stride inside the method (``align``), so every strided layer samples the grid of the untiled
   call, and the halo covers the receptive field of everything the method does before its patch
   map (backbone, neighbourhood averaging, upsampling of deeper layers). Memory: one tile's
   activations plus the patch map, (H / 8) x (W / 8) x channels floats.
2. **Pixel level.** The patch map is upsampled by exactly the stride and blurred (the same
   :func:`fastad.postprocess.anomaly_maps` as ``predict``) in bands of rows with a halo of the
   blur's radius, each band written to ``out`` (a NumPy array or ``np.memmap``) as it is made.

The image score comes from the whole patch map (PatchCore: Eq. 7 at the global worst patch, whose
feature is recomputed from the one tile around it; SPADE: the mean distance to the chosen images,
or the final map's maximum). The result equals ``model.predict`` on the whole
image up to float32 rounding where that fits in memory, with one convention made explicit: upsampling
is by the exact stride, then cropped, so that it does not depend on the image size; ``predict``
upsamples to the image size, which is the same whenever the sides are multiples of the stride.

**Across processes.** Under a ``torch.distributed`` group every process calls ``predict_large``
with the same image. The tiles of the patch-level pass are divided among the processes in
consecutive blocks; each fills its tiles' places of a zeroed patch map and one all-reduce (sum)
joins them, exact because every place comes from one tile and x + 0 = x. Every process then has
the patch map and the image score of one process; process 0 alone writes the pixel map to
``out`` (the others return ``map`` None and leave their ``out`` untouched). A PatchCore whose
bank is split across the processes searches it together for every tile, so there every process
scores every tile instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed, tiling
from .checks import check_int
from .data import load_image
from .geo import RasterReader
from .postprocess import _kernel_radius, gaussian_blur
from .tiling import plan as tiling_plan

__all__ = ["TileGeometry", "TiledScorer", "LargePrediction", "predict_large", "fit_large"]


@dataclass(frozen=True)
class TileGeometry:
    """How a method's patch outputs tile: ``stride`` of its patch map in input pixels, ``align``
    (the deepest stride inside it; window origins are multiples of it), ``halo`` (input pixels
    around a patch its outputs depend on, a multiple of ``align``) and ``same_padding`` (the
    backbone pads like TensorFlow's "same"; see :func:`fastad.tiling.tiled_apply`)."""

    stride: int
    align: int
    halo: int
    same_padding: bool = False

    def rounded_tile(self, tile: int) -> int:
        """``tile`` rounded down to a multiple of ``align`` (at least one): window origins must be."""
        return max(self.align, tile - tile % self.align)

    def tiling_args(self, tile: int, **extra: Any) -> dict[str, Any]:
        """The keyword arguments of ``fastad.tiling``'s ``tiled_apply`` / ``tiled_cores`` /
        ``tiled_sum`` for tiles of about ``tile`` pixels with this geometry, plus ``extra``
        (``device``, ``progress``, ``part``)."""
        return dict(
            tile=self.rounded_tile(tile),
            halo=self.halo,
            stride=self.stride,
            align=self.align,
            same_padding=self.same_padding,
            **extra,
        )


@dataclass(frozen=True)
class TiledScorer:
    """What a method gives :func:`predict_large` (``model._tiled_scorer``): ``fn`` maps (N, 3, h, w)
    windows to (N, C, h', w') outputs at the geometry's stride, channel 0 the patch score;
    ``image_score(outputs, patch_valid)`` gives the image score from the stitched outputs (or None:
    the final map's maximum); ``stitched``: how many leading channels are stitched into
    ``outputs`` (None: all); ``observe((oy, ox), core)``: sees every tile's full core output as
    it is made (a reduction over channels too many to stitch, such as MLF-SC's per-channel errors);
    ``merge()``: when the tiles were divided among processes, joins what ``observe`` saw on each
    (a collective every process calls), needed whenever ``observe`` is given."""

    fn: Any
    image_score: Any
    stitched: int | None = None
    observe: Any = None
    merge: Any = None


@dataclass
class LargePrediction:
    """``score``: the image score; ``map``: (H, W) float32 anomaly map (``out`` when an array was
    given, None when ``out`` was a sink);
    ``patch_map``: (ceil(H / stride), ceil(W / stride)) float32 patch scores; ``stride``."""

    score: float
    map: np.ndarray
    patch_map: np.ndarray
    stride: int


def predict_large(
    model: Any,
    image: Any,
    *,
    tile: int = 1024,
    out: Any = None,
    band: int = 512,
    progress: bool | None = None,
) -> LargePrediction:
    """Scores one image of any size at its own resolution, tile by tile.

    Args:
        model: a fitted method that supports tiling (PatchCore, SPADE, MLF-SC); others raise a ValueError that
            says what they support instead.
        image: (3, H, W) float tensor or array in the model's input scale (what ``predict`` takes
            after its transform), a path (see :func:`open_image`), a :class:`fastad.geo.RasterReader`
            or any :class:`fastad.tiling.TileReader`. A reader with a ``valid(y0, y1, x0, x1)``
            method (``RasterReader``: nodata, alpha, masks) masks the map with NaN where the image
            holds no data; PatchCore's image score (and any score taken from the map's maximum)
            ignores those places, SPADE's mean distance to its chosen images does not.
        tile: core side of a tile in input pixels, rounded down to a multiple of the method's
            ``align`` (at least one ``align``). Memory grows with (tile + 2 halo)^2.
        out: where the (H, W) float32 map goes: None (a new array), an (H, W) float32 array or
            writable ``np.memmap``, or a sink with ``write(y0, rows)`` taking bands of rows in
            order (:class:`fastad.geo.MapWriter`: a GeoTIFF and a quick-look).
        band: output rows per band of the pixel-level pass.
        progress: a bar over tiles; None shows one when stderr is a terminal.

    Returns:
        :class:`LargePrediction` (``map`` is None when ``out`` is a sink, and on every process but
        0 of a group; see the module docstring).
    """
    _check_native_resolution(model)
    model._check_fitted()
    geometry = model.tile_geometry()
    check_int(tile, "tile")
    check_int(band, "band")
    tile = geometry.rounded_tile(tile)
    reader = open_image(image)
    try:
        return _predict_large(model, reader, geometry, tile, out, band, progress)
    finally:
        _close_if_opened(image, reader)


def _predict_large(model, reader, geometry: TileGeometry, tile: int, out: Any, band: int, progress) -> LargePrediction:
    channels, height, width = reader.shape
    if channels != 3:
        raise ValueError(f"predict_large needs a 3-channel image, got {channels} channels")
    rank, size = distributed.world()
    if out is None and rank == 0:
        out = np.empty((height, width), dtype=np.float32)
    if out is None:  # a process other than 0 of a group, given nowhere to write: it writes nothing
        emit = _discard
    elif isinstance(out, np.ndarray):
        if out.shape != (height, width) or out.dtype != np.float32:
            raise ValueError(
                f"out must be a float32 (H, W) = ({height}, {width}) array or np.memmap, got {out.dtype} {out.shape}"
            )
        if not out.flags.writeable:
            raise ValueError("out is read-only (an np.memmap opened with mode='r'?)")
        array = out

        def emit(y0: int, rows: np.ndarray) -> None:
            array[y0 : y0 + rows.shape[0]] = rows
    elif callable(getattr(out, "write", None)) and tuple(getattr(out, "shape", ())) == (height, width):
        emit = out.write
    else:
        raise ValueError(
            f"out must be None, a float32 ({height}, {width}) array or a sink with write(y0, rows) "
            f"and shape ({height}, {width}), got {type(out).__name__}"
        )
    valid = getattr(reader, "valid", None)
    if rank != 0:  # process 0 alone writes the map (see the module docstring); out is checked above all the same
        emit = _discard
    # A bank split across the processes is searched by all of them together, tile by tile.
    part = (rank, size) if size > 1 and not model._split_state_names() else None
    with torch.inference_mode():
        scorer = model._tiled_scorer(reader, geometry, tile, progress)
        if not isinstance(scorer, TiledScorer):
            scorer = TiledScorer(*scorer)
        outputs = _stitched_outputs(scorer, reader, geometry, tile, model.device, progress, part)
        image_score = scorer.image_score
        patch_map = np.ascontiguousarray(outputs[0], dtype=np.float32)
        patch_valid = None if valid is None else np.ones(patch_map.shape, dtype=bool)
        s = geometry.stride
        top = [-math.inf]  # the map's largest value where the image holds data

        def masked_emit(y0: int, rows: np.ndarray) -> None:
            if valid is not None:
                ok = valid(y0, y0 + rows.shape[0], 0, width)
                rows = np.where(ok, rows, np.float32(np.nan))
                first = -(-y0 // s) * s  # the band's rows that are patch centres
                patch_valid[first // s : -(-(y0 + rows.shape[0]) // s)] = ok[first - y0 :: s, ::s]
            if np.isfinite(rows).any():
                top[0] = max(top[0], float(np.nanmax(rows)))
            emit(y0, rows)

        _pixel_map_in_bands(
            torch.from_numpy(patch_map),
            s,
            (height, width),
            model.upsample_mode,
            float(model.blur_sigma),
            masked_emit,
            band,
        )
        score = image_score(outputs, patch_valid)
        if score is None:  # the method's image score is the map's maximum
            score = top[0] if math.isfinite(top[0]) else math.nan
        score = float(score)
    wrote = isinstance(out, np.ndarray) and rank == 0
    return LargePrediction(score=score, map=out if wrote else None, patch_map=patch_map, stride=geometry.stride)


def _discard(y0: int, rows: np.ndarray) -> None:
    """Where the map rows of a process other than 0 of a group go."""


def _stitched_outputs(
    scorer: TiledScorer,
    reader,
    geometry: TileGeometry,
    tile: int,
    device,
    progress,
    part: tuple[int, int] | None = None,
) -> np.ndarray:
    """(C, ceil(H / s), ceil(W / s)) outputs of ``scorer.fn`` (its first ``stitched`` channels),
    every core shown to ``scorer.observe`` on the way. ``part`` (rank, size): this process makes
    its block of the tiles and the processes' maps are summed (each place is made by one tile)."""
    _, height, width = reader.shape
    s = geometry.stride
    out = None
    if part is not None and scorer.observe is not None and scorer.merge is None:
        raise ValueError(
            "this method's tiled scorer observes every tile but cannot merge what it saw across "
            "processes (TiledScorer.merge)"
        )
    for (oy, ox), core in tiling.tiled_cores(
        scorer.fn, reader, **geometry.tiling_args(tile, device=device, progress=progress, part=part)
    ):
        if scorer.observe is not None:
            scorer.observe((oy, ox), core)
        kept = core if scorer.stitched is None else core[: scorer.stitched]
        if out is None:
            dtype = np.float64 if kept.dtype == torch.float64 else np.float32
            allocate = np.zeros if part is not None else np.empty  # zeros: the other processes' places
            out = allocate((kept.shape[0], -(-height // s), -(-width // s)), dtype=dtype)
        out[:, oy : oy + kept.shape[1], ox : ox + kept.shape[2]] = kept.cpu().numpy()
    if part is None:
        return out
    # A process with no tile (more processes than tiles) learns the map's channels and dtype here.
    layouts = [x for x in distributed.all_gather_objects(None if out is None else (out.shape[0], out.dtype.str)) if x]
    if out is None:
        out = np.zeros((layouts[0][0], -(-height // s), -(-width // s)), dtype=np.dtype(layouts[0][1]))
    joined = torch.from_numpy(out)
    torch.distributed.all_reduce(joined)  # in place: x + 0 = x at every place
    if scorer.merge is not None:
        scorer.merge()
    return out


def fit_large(model: Any, images: Any, *, tile: int = 1024, progress: bool | None = None) -> Any:
    """Fits ``model`` on normal images at their own resolution, each read and processed tile by
    tile, so the backbone's activations are bounded by the tile whatever the image's size (the
    method's own state, e.g. PatchCore's patches before the coreset, still grows with the data).

    Args:
        model: a method that supports it (PatchCore, SPADE, MLF-SC); others raise a ValueError saying so.
        images: an iterable of images (each a (3, H, W) tensor or array, a path, or a
            :class:`fastad.tiling.TileReader`; sizes may differ), read one at a time.
        tile, progress: as for :func:`predict_large`.

    Returns ``model``, fitted as ``fit(..., holdout=0)`` would on the same images: no images are
    held back, so ``threshold_`` is None.

    Under a ``torch.distributed`` group (PatchCore and SPADE) every process calls it with the same
    list of images and reads its consecutive block of them; the model is then the one a single
    process fits on them all, as with ``fit``.
    """
    model._check_params()
    _check_native_resolution(model)
    for name in [n for n in vars(model) if n.endswith("_") and not n.startswith("_")]:
        delattr(model, name)  # a failed fit must not leave a half-old model that looks fitted
    check_int(tile, "tile")
    if distributed.is_distributed():
        rank, size = distributed.world()
        reason = model._cannot_fit_across_processes()
        if reason or not model.fits_tiled_across_processes:
            raise ValueError(
                reason
                or f"{type(model).__name__} does not fit tile by tile across processes "
                f"(torch.distributed has {size}): fit it in one process, or with fit() on resized images"
            )
        images = list(images)
        if len(images) < size:
            raise ValueError(f"fitting across {size} processes needs at least one image per process, got {len(images)}")
        block = distributed.shard(len(images))
        images = images[block.start : block.stop]
        if model.draws_tiled_keys:
            # The method skips the keys of the images before this process's block: each process
            # counts its own from the images' shapes (AnomalyModel.draws_tiled_keys).
            counts = distributed.all_gather_objects(sum(model._tiled_keys(_shape_of(image)) for image in images))
            model.__dict__["_keys_before"] = sum(counts[:rank])

    def readers():
        for image in images:
            reader = open_image(image)
            try:
                yield reader
            finally:
                _close_if_opened(image, reader)

    with torch.inference_mode():
        count = distributed.all_reduce_sum(int(model._fit_tiled(readers(), tile, progress)))
    if count == 0:
        raise ValueError("no images were given to fit on")
    model.n_train_images_ = count
    model.threshold_ = None
    if hasattr(model, "_cached_extractor"):  # the weights' digest, as FeatureModel.fit records it
        model.backbone_weights_ = dict(model._cached_extractor()[1])
    return model


def _shape_of(image: Any) -> tuple[int, int, int]:
    """(C, H, W) of an image as fit_large takes it (opened and closed again for a path)."""
    reader = open_image(image)
    try:
        return tuple(reader.shape)
    finally:
        _close_if_opened(image, reader)


# Raster formats read window by window with rasterio; other image files are decoded whole with
# fastad.data.load_image (EXIF orientation, palettes, grey + alpha), as predict reads them.
_RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")


def open_image(image: Any):
    """A tile reader for ``image``: a GeoTIFF / TIFF path (also ``.vrt``, ``.jp2``, ``.img``)
    opens with :class:`fastad.geo.RasterReader` (windows decoded lazily, nodata known; a TIFF falls
    back to :class:`fastad.tiling.TiffReader` without rasterio), another image file (PNG, JPEG) is
    decoded whole by :func:`fastad.data.load_image`, and a ``.npy`` path, an array or a reader goes
    to :func:`fastad.tiling.open_reader`."""
    import os

    if isinstance(image, (str, os.PathLike)):
        suffix = os.path.splitext(str(image))[1].lower()
        if suffix in _RASTER_SUFFIXES:
            try:
                return RasterReader(image)
            except ImportError:
                if suffix not in (".tif", ".tiff"):
                    raise
        elif suffix != ".npy":
            return tiling.ArrayReader(load_image(image))
    return tiling.open_reader(image)


def _check_native_resolution(model: Any) -> None:
    """Tiles are scored at the image's own scale; a model that resizes its inputs learned another."""
    if getattr(model, "resize", None) is not None or getattr(model, "crop", None) is not None:
        raise ValueError(
            f"this {type(model).__name__} resizes its inputs (resize={model.resize}, crop={model.crop}), but tiles are "
            "scored at the image's own resolution, a scale it did not learn: fit it with resize=None and crop=None "
            "(fastad fit ... --set resize=null --set crop=null)"
        )


def _close_if_opened(image: Any, reader: Any) -> None:
    """Closes a reader made here from a path (a reader the caller passed stays open)."""
    if reader is not image and callable(getattr(reader, "close", None)):
        reader.close()


# Measured halos by (key, stride, align, device): one measurement per process and pipeline, since
# it costs tens of forward passes on probes of up to 2048 x 2048 (seconds to a minute on a CPU),
# and every model loaded from the same file, or fitted with the same options, has the same field.
_MEASURED_HALOS: dict[tuple, int] = {}


def measured_halo(fn, stride: int, align: int, device, key: tuple) -> int:
    """The receptive-field radius of ``fn`` (3-channel input, output at ``stride``), measured on
    random inputs (:func:`fastad.tiling.receptive_field`), rounded up to ``align`` plus one
    ``align`` of margin for dependences the probe could not see.

    ``key`` names everything the field of ``fn`` depends on (the method, its feature pipeline's
    identity and its own options): the measurement is made once per process for each key."""
    cache_key = (key, stride, align, str(device))
    if cache_key not in _MEASURED_HALOS:
        field = tiling.receptive_field(fn, 3, stride_hint=stride, size=4 * align, max_size=2048, device=device)
        _MEASURED_HALOS[cache_key] = -(-field.radius // align) * align + align
    return _MEASURED_HALOS[cache_key]


def window_around(
    position: tuple[int, int], size: tuple[int, int], geometry: TileGeometry
) -> tuple[int, int, int, int]:
    """The read window (y0, y1, x0, x1) of one ``align`` cell around input ``position`` with the
    method's halo, clipped to the image (and, for "same" padding, grown to the image's length
    modulo ``align``): what a method re-reads to recompute one patch's feature exactly as the tile
    that held it did."""
    (y, x), (height, width), a, h = position, size, geometry.align, geometry.halo
    residue = a if geometry.same_padding else 0
    rows = tiling_plan.axis_spans(height, a, h, residue)[y // a]
    cols = tiling_plan.axis_spans(width, a, h, residue)[x // a]
    return rows[2], rows[3], cols[2], cols[3]


def upsample_by_stride(patch_maps: Tensor, stride: int, size: tuple[int, int], mode: str) -> Tensor:
    """(N, h, w) -> (N, H, W): upsampled by exactly ``stride`` (``align_corners=False``), then
    cropped to ``size``; position-free, unlike resizing to a size that is not a multiple."""
    align = {} if mode == "nearest" else {"align_corners": False}
    up = F.interpolate(patch_maps[:, None], scale_factor=stride, mode=mode, **align)[:, 0]
    return up[:, : size[0], : size[1]]


def _pixel_map_in_bands(
    patch_map: Tensor, stride: int, size: tuple[int, int], mode: str, sigma: float, emit, band: int
) -> None:
    """Upsamples and blurs the whole (h, w) patch map into (H, W) rows, ``band`` rows at a time,
    each band handed to ``emit(y0, rows)`` in order. A band is computed from the patch rows that
    cover it plus the blur's radius and the
    interpolation's reach; rows within the halo of an inner band edge are discarded, and at the
    image's own top and bottom the blur mirrors exactly as on the whole map."""
    height, width = size
    radius = _kernel_radius(sigma) if sigma > 0 else 0
    reach = 2 if mode == "bicubic" else 1  # patch rows beyond a band's own that interpolation reads
    halo_rows = math.ceil(radius / stride) + reach
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        p0 = max(0, y0 // stride - halo_rows)
        p1 = min(patch_map.shape[0], -(-y1 // stride) + halo_rows)
        up = upsample_by_stride(patch_map[None, p0:p1].float(), stride, (height - p0 * stride, width), mode)
        blurred = gaussian_blur(up, sigma)[0] if sigma > 0 else up[0]
        emit(y0, blurred[y0 - p0 * stride : y1 - p0 * stride].numpy())

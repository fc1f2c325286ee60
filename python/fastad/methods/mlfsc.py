"""MLF-SC: multi-layer features and sparse coding (Imamura et al., "MLF-SC: Incorporating
multi-layer features to sparse coding for anomaly detection", arXiv:2104.04289, 2021).

By default the pipeline is the authors' code (LeapMind/MLF-SC), step by step:

1. **Input**: each image resized to 256 x 256 (no crop).
2. **Levels** (``levels="scaled_inputs"``): the normalised image max-pooled by 1, 2 and 4 and run
   through VGG-16 to ``conv4_3``, ``conv3_3`` and ``conv2_2`` respectively, before their ReLU, so
   each level comes out natively on the same 32 x 32 grid (stride 8 of the input):
   128 + 256 + 512 = 896 channels.
3. **Cut-off**: ``cutoff`` = 2 cells cut from every edge (28 x 28), then each image's channels
   standardised over its grid (mean and unbiased standard deviation, ``standardize``).
4. **Patches**: every channel cut into 8 x 8 patches with stride 2 (121 a channel, 64 values each).
5. **Dictionaries** (``dictionary_fit="sklearn_lasso"``): one per channel, 5 atoms, learned by
   scikit-learn's mini-batch dictionary learning with LARS lasso codes (alpha 1), starting from
   the SVD of all training patches, 50 mini-batches of 3
   (:class:`fastad.dictionary.SampledLassoDictionaries` says how it is streamed).
6. **Scores**: a patch's error is its squared reconstruction error under OMP with 3 non-zeros;
   a channel's score is the *sum* of its 5 largest patch errors; the image score sums the channels.
7. **Map** (``map_mode="last_patch"``): the authors' picture: the channel maps re-assembled from
   the patches in raster order, each later patch overwriting the earlier ones, so every cell
   shows the reconstruction of the last patch covering it; the cell's value is the squared
   difference of original and reconstruction, divided by 1.5^2 and averaged over channels. The
   cut-off cells (and any the patches do not reach) repeat the nearest computed cell; the base
   class then upsamples and blurs.

Named departures, each reproducing an earlier fastad behaviour: ``levels="resized_maps"`` (one
forward pass, each level resized bilinearly to ``feature_size`` = 32); ``standardize=False``;
``dictionary_fit="streamed_omp"`` (:class:`fastad.dictionary.DictionaryLearner`, OMP-coded, all
channels batched: seconds rather than half a minute); ``map_mode="patch_mean"`` (each patch's
error summed over channels, spread over its cells and averaged where patches overlap);
``resize=256, crop=224``. One difference is not switchable: the resize is antialiased bilinear
(``fastad.data.ResizeCrop``) where the authors' OpenCV resize samples without antialiasing.

Images of any size: with ``resize=None`` the grid is the image's size / 8, and
``fastad.highres.predict_large`` / ``fit_large`` score and fit scenes of any size tile by tile,
equal to the untiled call (the standardisation's statistics come from a first pass over the
whole image).

The module is one class of about 640 lines, on purpose: MLF-SC's pipeline has more steps than the
other methods (levels, cut-off, per-image standardisation, one dictionary per channel, two
learners, two map modes), and the tiled fit and scoring at the end are those same steps applied
window by window (``_window_levels``, ``_cut``, ``_code``); split across files they would have to
reach into each other's private steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .. import distributed, ops
from ..checks import check_int, check_state_tensor
from ..dictionary import DictionaryLearner, SampledLassoDictionaries
from ..features import BACKBONES
from ..highres import TiledScorer, TileGeometry
from ..tiling import tile_windows, tiled_cores
from .base import register_method
from .feature_model import FeatureModel

# Patches of at most this many values (all channels) are formed at once: 32 M floats, 128 MB.
_CHUNK_VALUES = 2**25
# How far from 1 an atom's norm may be: what fastad.ops.omp accepts.
_ATOM_NORM_TOLERANCE = 1e-3
# A channel whose values vary less than this over an image is standardised to zeros (the
# authors' division would give NaN).
_TINY_STD = 1e-12
# The authors' picture divides each squared difference by 1.5^2 before averaging over channels.
_MAP_SCALE = 1.5**2

LEVELS = ("scaled_inputs", "resized_maps")
DICTIONARY_FITS = ("sklearn_lasso", "streamed_omp")
MAP_MODES = ("last_patch", "patch_mean")


@register_method("mlfsc")
class MLFSC(FeatureModel):
    """MLF-SC as its authors ran it; every number and every departure is a named parameter.

    Parameters (besides :class:`FeatureModel`'s and :class:`AnomalyModel`'s, passed as ``**common``):

    * ``backbone``: ``"vgg16"`` (the paper); its layers default to the strides 2, 4, 8
      (``conv2_2``, ``conv3_3``, ``conv4_3``); other backbones take ``layers`` by name;
    * ``pre_relu``: VGG's convolution outputs before the ReLU (the authors' taps);
    * ``levels``: ``"scaled_inputs"`` (the authors: each layer computed from the input max-pooled
      by the deepest layer's stride over its own, so all levels share the deepest grid) or
      ``"resized_maps"`` (one pass, every level resized to ``feature_size``);
    * ``feature_size``: the grid of ``"resized_maps"`` (32);
    * ``cutoff``: cells cut from every edge of the grid (2);
    * ``standardize``: each image's channels to zero mean and unit (unbiased) standard deviation
      over the cut grid (True);
    * ``patch_size`` / ``patch_stride``: the patches cut from each channel (8 / 2);
    * ``n_atoms`` / ``n_nonzero``: atoms per channel's dictionary and OMP's non-zeros (5 / 3);
    * ``top_k``: a channel's score sums its ``top_k`` largest patch errors (5);
    * ``dictionary_fit``: ``"sklearn_lasso"`` (the authors) or ``"streamed_omp"``;
      ``alpha`` (lasso penalty, 1.0), ``dictionary_steps`` (mini-batches of the lasso fit, 50),
      ``dictionary_batch`` (signals per mini-batch; None: 3 for the lasso fit as the authors'
      scikit-learn had, 256 for the streamed OMP learner) and ``seed``;
    * ``map_mode``: ``"last_patch"`` (the authors' picture) or ``"patch_mean"``;
    * ``resize`` / ``crop``: (256, 256) / None, the authors' input.

    Learned: ``dictionary_`` (C, n_atoms, patch_size**2) float32, one unit-norm dictionary per channel.
    """

    default_strides: ClassVar[tuple[int, ...]] = (2, 4, 8)

    def __init__(
        self,
        *,
        backbone: str = "vgg16",
        pre_relu: bool = True,
        levels: str = "scaled_inputs",
        feature_size: int = 32,
        cutoff: int = 2,
        standardize: bool = True,
        patch_size: int = 8,
        patch_stride: int = 2,
        n_atoms: int = 5,
        n_nonzero: int = 3,
        top_k: int = 5,
        dictionary_fit: str = "sklearn_lasso",
        alpha: float = 1.0,
        dictionary_steps: int = 50,
        dictionary_batch: int | None = None,
        map_mode: str = "last_patch",
        seed: int = 0,
        resize: Any = (256, 256),
        crop: Any = None,
        **common: Any,
    ) -> None:
        # A list, as the model file's JSON gives it back, so that a loaded model's parameters equal these.
        super().__init__(
            backbone=backbone, resize=list(resize) if isinstance(resize, tuple) else resize, crop=crop, **common
        )
        self.pre_relu = pre_relu
        self.levels = levels
        self.feature_size = feature_size
        self.cutoff = cutoff
        self.standardize = standardize
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.n_atoms = n_atoms
        self.n_nonzero = n_nonzero
        self.top_k = top_k
        self.dictionary_fit = dictionary_fit
        self.alpha = alpha
        self.dictionary_steps = dictionary_steps
        self.dictionary_batch = dictionary_batch
        self.map_mode = map_mode
        self.seed = seed

    def _backbone_options(self) -> dict[str, Any]:
        return {"pre_relu": True} if self.pre_relu and BACKBONES[self.backbone].family == "vgg" else {}

    def _extractor_options(self) -> dict[str, Any]:
        if self.levels != "scaled_inputs":
            return {}
        strides = self._layer_strides()
        deepest = max(strides.values())
        return {"input_pools": {layer: deepest // stride for layer, stride in strides.items()}}

    def _check_params(self) -> None:
        super()._check_params()
        for name, allowed in (("levels", LEVELS), ("dictionary_fit", DICTIONARY_FITS), ("map_mode", MAP_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        for name in ("feature_size", "patch_size", "patch_stride", "n_atoms", "n_nonzero", "top_k", "dictionary_steps"):
            check_int(getattr(self, name), name)
        check_int(self.cutoff, "cutoff", minimum=0)
        check_int(self.seed, "seed", minimum=0)
        if self.dictionary_batch is not None:
            check_int(
                self.dictionary_batch, "dictionary_batch", meaning="or None: 3 for sklearn_lasso, 256 for streamed_omp"
            )
        if not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number (the lasso penalty), got {self.alpha!r}")
        if self.levels == "scaled_inputs":
            strides = self._layer_strides()
            deepest = max(strides.values())
            if any(deepest % s for s in strides.values()):
                raise ValueError(
                    f"levels='scaled_inputs' needs layer strides that divide the deepest one, got {strides}"
                )
        elif self.patch_size > self.feature_size - 2 * self.cutoff:
            raise ValueError(
                f"need patch_size <= feature_size - 2 cutoff, got {self.patch_size}, {self.feature_size}, {self.cutoff}"
            )
        if self.n_nonzero > min(self.n_atoms, self.patch_size**2):
            raise ValueError(
                f"n_nonzero ({self.n_nonzero}) must be at most n_atoms ({self.n_atoms}) "
                f"and patch_size**2 ({self.patch_size**2})"
            )
        if self.dictionary_fit == "sklearn_lasso" and self.n_atoms > self.patch_size**2:
            raise ValueError(
                f"n_atoms ({self.n_atoms}) must be at most patch_size**2 ({self.patch_size**2}) for "
                "dictionary_fit='sklearn_lasso' (its initial atoms are singular vectors)"
            )

    def _check_state(self) -> None:
        super()._check_state()
        shape = (self.feature_channels(), self.n_atoms, self.patch_size**2)  # one dictionary per channel
        dictionary = check_state_tensor("dictionary_", getattr(self, "dictionary_", None), torch.float32, shape)
        # ops.omp codes over unit-norm atoms only (and refuses others, within this tolerance).
        low, high = (float(v) for v in torch.aminmax(torch.linalg.vector_norm(dictionary, dim=-1, dtype=torch.float64)))
        if not (abs(low - 1.0) <= _ATOM_NORM_TOLERANCE and abs(high - 1.0) <= _ATOM_NORM_TOLERANCE):
            raise ValueError(
                f"dictionary_ must hold atoms of unit norm (within {_ATOM_NORM_TOLERANCE}), "
                f"got norms from {low:.6g} to {high:.6g}"
            )

    # -- levels ----------------------------------------------------------------------------------

    def raw_levels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) float32: the levels on one grid before the cut-off and standardisation,
        channels in network order (``"scaled_inputs"``: h, w = the image's size // deepest stride)."""
        features = list(self._features(images).values())
        if self.levels == "resized_maps":
            size = (self.feature_size, self.feature_size)
            features = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features]
        # A side that is not a multiple of the stride: pooling floors, a "same"-padded backbone
        # (Lite0) rounds up, so the levels may differ by a last partial cell; it is dropped.
        h, w = min(f.shape[-2] for f in features), min(f.shape[-1] for f in features)
        return torch.cat([f[..., :h, :w] for f in features], dim=1)

    def _cut(self, levels: torch.Tensor) -> torch.Tensor:
        c = self.cutoff
        cut = levels[..., c : levels.shape[-2] - c, c : levels.shape[-1] - c] if c else levels
        if min(cut.shape[-2:]) < self.patch_size:
            raise ValueError(
                f"the image is too small for MLF-SC: its feature grid {tuple(levels.shape[-2:])} minus the "
                f"cut-off of {c} cells per edge leaves {tuple(cut.shape[-2:])}, smaller than one "
                f"{self.patch_size} x {self.patch_size} patch"
            )
        return cut

    def channel_statistics(self, cut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, 1, 1) mean and unbiased standard deviation of each image's channels over the cut
        grid, accumulated in float64 (as the tiled pass accumulates them)."""
        wide = cut.double()
        return wide.mean(dim=(2, 3), keepdim=True).float(), wide.std(dim=(2, 3), keepdim=True).float()

    def _standardised(self, cut: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        if not self.standardize:
            return cut
        return (cut - mean) / std.clamp_min(_TINY_STD)

    def level_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) float32: the cut, standardised levels that the patches are cut from."""
        cut = self._cut(self.raw_levels(images))
        return self._standardised(cut, *self.channel_statistics(cut))

    # -- patches ---------------------------------------------------------------------------------

    def _patch_grid(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, C, ny, nx, p, p): the patches of every channel (a view)."""
        p, s = self.patch_size, self.patch_stride
        return maps.unfold(2, p, s).unfold(3, p, s)

    def _as_signals(self, cut: torch.Tensor) -> torch.Tensor:
        """(B, C, ny, nx, p, p) -> (C, B * ny * nx, p * p), the layout ``fastad.ops.omp`` codes."""
        b, c = cut.shape[:2]
        return (
            cut.reshape(b, c, -1, self.patch_size**2)
            .permute(1, 0, 2, 3)
            .reshape(c, -1, self.patch_size**2)
            .contiguous()
        )

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(C, B * P, patch_size**2) float32: each channel's P patches of each image (image-major,
        raster order), the layout ``fastad.ops.omp`` codes with one dictionary per channel."""
        return self._as_signals(self._patch_grid(self.level_maps(images)))

    def _images_per_chunk(self, channels: int, cells: int) -> int:
        return max(1, _CHUNK_VALUES // (channels * cells * self.patch_size**2 // self.patch_stride**2 + 1))

    def _chunks(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        stride = max(self._layer_strides().values())
        cells = (
            (images.shape[-2] // stride) * (images.shape[-1] // stride)
            if self.levels == "scaled_inputs"
            else self.feature_size**2
        )
        yield from images.split(self._images_per_chunk(self.feature_channels(), cells))

    # -- fit -------------------------------------------------------------------------------------

    def _dictionary_batch(self) -> int:
        if self.dictionary_batch is not None:
            return int(self.dictionary_batch)
        return 3 if self.dictionary_fit == "sklearn_lasso" else 256

    def _new_learner(self, channels: int):
        """The dictionary learner, and for the lasso fit the generator of the patches' sampling
        keys (drawn image by image in raster order, so any chunking or tiling gives one sample)."""
        d = self.patch_size**2
        if self.dictionary_fit == "sklearn_lasso":
            learner = SampledLassoDictionaries(
                channels,
                self.n_atoms,
                d,
                alpha=float(self.alpha),
                steps=int(self.dictionary_steps),
                batch_size=self._dictionary_batch(),
                seed=int(self.seed),
            )
            return learner, torch.Generator().manual_seed(int(self.seed))
        learner = DictionaryLearner(
            channels,
            self.n_atoms,
            d,
            self.n_nonzero,
            batch_size=self._dictionary_batch(),
            seed=int(self.seed),
            device=self.device,
        )
        return learner, None

    def _learn(self, learner, keys: torch.Generator | None, signals: torch.Tensor, images: int) -> None:
        if keys is None:
            learner.partial_fit(signals)
            return
        # One draw per image, as the tiled fit draws them (draw sizes never change the sequence).
        per_image = signals.shape[1] // images
        learner.add(
            signals, torch.cat([torch.rand(per_image, generator=keys, dtype=torch.float64) for _ in range(images)])
        )

    fits_across_processes = True  # with the authors' (default) dictionary fit; see _cannot_fit_across_processes
    fits_tiled_across_processes = True  # the same; fit_large counts the keys of the earlier processes' images
    draws_tiled_keys = True

    def _finish(self, learner) -> None:
        if isinstance(learner, SampledLassoDictionaries):
            self.dictionary_ = learner.finish(progress=False).to(self.device)
        else:
            self.dictionary_ = learner.dictionary_.float().contiguous()

    def _cannot_fit_across_processes(self) -> str | None:
        if self.dictionary_fit == "sklearn_lasso":
            return None
        return (
            f"MLFSC with dictionary_fit={self.dictionary_fit!r} does not fit across processes (its streamed "
            "updates are sequential): use dictionary_fit='sklearn_lasso' (the default) or fit in one process"
        )

    def _fit_batches(self, batches: Iterator[torch.Tensor]) -> None:
        several = distributed.is_distributed()
        learner = keys = None
        for images in batches:
            for chunk in self._chunks(images):
                x = self.patches(chunk)
                if learner is None:
                    learner, keys = self._new_learner(x.shape[0])
                    if several:  # the keys the processes before this one draw for their images
                        _skip_draws(keys, self.__dict__.get("_fitted_before", 0) * (x.shape[1] // chunk.shape[0]))
                self._learn(learner, keys, x, chunk.shape[0])
        self._finish_learning(learner)

    def _finish_learning(self, learner) -> None:
        """The dictionaries from the learner; under torch.distributed the processes' statistics
        and samples are merged first, each process finishes its block of the dictionaries and
        every process gets them all."""
        if not distributed.is_distributed():
            if learner is not None:
                self._finish(learner)
            return
        if not all(distributed.all_gather_objects(learner is not None)):
            raise ValueError("fitting MLFSC across processes needs at least one image to fit on in every process")
        learner.all_reduce_()
        atoms = learner.finish(progress=False, groups=distributed.shard(learner.groups))
        self.dictionary_ = distributed.all_gather_rows(atoms).to(self.device)

    # -- score -----------------------------------------------------------------------------------

    def _code(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes the patches of cut, standardised ``maps`` (B, C, h, w): (C, B, ny, nx) squared
        patch errors and the (B, h', w') map of the cells the patches cover (``map_mode``).
        Patch rows are coded a few at a time, so a large window's patches never exist all at once."""
        grid = self._patch_grid(maps)
        b, c, ny, nx = grid.shape[:4]
        if c != self.dictionary_.shape[0]:
            raise ValueError(
                f"the features have {c} channels but the model has {self.dictionary_.shape[0]} "
                "dictionaries; were the backbone or layers changed after fit?"
            )
        p, s = self.patch_size, self.patch_stride
        step = max(1, _CHUNK_VALUES // (b * c * nx * p * p))
        errors, per_cell = [], []
        for y0 in range(0, ny, step):
            part = grid[:, :, y0 : y0 + step]
            x = self._as_signals(part)
            indices, coefs = ops.omp(x, self.dictionary_, int(self.n_nonzero))
            if self.map_mode == "patch_mean":
                errors.append(ops.omp_error(x, indices, coefs, self.dictionary_).reshape(c, b, -1, nx))
                continue
            atoms = self.dictionary_[
                torch.arange(c, device=x.device)[:, None, None], indices.clamp_min(0)
            ]  # (C, M, s, d)
            used = (indices >= 0).unsqueeze(-1)
            squared = (x - torch.where(used, coefs.unsqueeze(-1) * atoms, 0.0).sum(2)).square()  # (C, M, d)
            errors.append(squared.sum(-1).reshape(c, b, -1, nx))
            per_cell.append(squared.sum(0).reshape(b, -1, nx, p, p))  # summed over channels
        errors = torch.cat(errors, dim=2)
        h, w = (ny - 1) * s + p, (nx - 1) * s + p  # the cells the patches cover
        if self.map_mode == "patch_mean":
            per_patch = errors.sum(0).reshape(b, 1, -1).expand(b, p * p, ny * nx)
            spread = F.fold(per_patch, output_size=(h, w), kernel_size=p, stride=s)
            cover = F.fold(torch.ones_like(per_patch), output_size=(h, w), kernel_size=p, stride=s)
            return errors, (spread / cover)[:, 0]
        # Each cell shows the last patch (raster order) covering it: patch index min(i // s, n - 1)
        # along each axis, at offset i - s * index inside it.
        per_cell = torch.cat(per_cell, dim=1)
        rows, cols = torch.arange(h, device=maps.device), torch.arange(w, device=maps.device)
        py, px = (rows // s).clamp_max(ny - 1), (cols // s).clamp_max(nx - 1)
        oy, ox = rows - s * py, cols - s * px
        cell_map = per_cell[:, py[:, None], px[None, :], oy[:, None], ox[None, :]] / (_MAP_SCALE * c)
        return errors, cell_map

    def _full_grid(self, cell_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h', w') map of the covered cells -> (B, *grid), the cut-off cells and any the patches
        do not reach repeating the nearest computed cell."""
        c = self.cutoff
        bottom, right = grid[0] - c - cell_map.shape[1], grid[1] - c - cell_map.shape[2]
        if not (c or bottom or right):
            return cell_map
        return F.pad(cell_map[:, None], (c, right, c, bottom), mode="replicate")[:, 0]

    def patch_errors(self, images: torch.Tensor) -> torch.Tensor:
        """(C, B, P) squared reconstruction errors of every patch of every channel."""
        return torch.cat([self._code(self.level_maps(chunk))[0].flatten(2) for chunk in self._chunks(images)], dim=1)

    def _score_batch(self, images: torch.Tensor):
        errors, maps = [], []
        for chunk in self._chunks(images):
            raw = self.raw_levels(chunk)
            cut = self._cut(raw)
            chunk_errors, cell_map = self._code(self._standardised(cut, *self.channel_statistics(cut)))
            errors.append(chunk_errors.flatten(2))
            maps.append(self._full_grid(cell_map, raw.shape[-2:]))
        errors = torch.cat(errors, dim=1)  # (C, B, P)
        k = min(int(self.top_k), errors.shape[-1])
        image_scores = errors.topk(k, dim=-1).values.sum(-1).sum(0)
        return torch.cat(maps), image_scores

    # -- native resolution (fastad.highres) ------------------------------------------------------

    def tile_geometry(self):
        """The map's grid is the deepest layer's stride; window origins are multiples of the
        patch grid's step (``patch_stride`` cells), so that each window's patches lie on the
        image's; the halo is the levels' measured receptive field plus the reach of the patches
        (a cell's value comes from a patch starting up to ``patch_size`` cells before or after it)
        and of the cut-off, which every window applies at its own edges."""
        if self.levels != "scaled_inputs":
            raise ValueError(
                "levels='resized_maps' resizes every level to a fixed grid, which depends on the image's size; "
                "native-resolution scoring needs levels='scaled_inputs'"
            )
        stride = max(self._layer_strides().values())
        align = stride * self.patch_stride
        field = self._measured_halo(self.raw_levels, stride, align, self.levels)
        reach = (self.patch_size + self.patch_stride + self.cutoff) * stride
        halo = -(-(field + reach) // align) * align
        return TileGeometry(stride=stride, align=align, halo=halo, same_padding=BACKBONES[self.backbone].same_padding)

    def _image_statistics(self, reader, geometry, tile: int, progress) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, C, 1, 1) mean and unbiased std of the whole image's cut grid, from one tiled pass of sums."""
        _, height, width = reader.shape
        stride, c = geometry.stride, self.cutoff
        rows, cols = height // stride, width // stride
        total = squares = None
        for (oy, ox), core in tiled_cores(
            self._window_levels, reader, **geometry.tiling_args(tile, device=self.device, progress=progress)
        ):
            y0, y1 = max(oy, c), min(oy + core.shape[1], rows - c)
            x0, x1 = max(ox, c), min(ox + core.shape[2], cols - c)
            if y1 <= y0 or x1 <= x0:
                continue
            part = core[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox].double()
            s, q = part.sum(dim=(1, 2)).cpu(), part.square().sum(dim=(1, 2)).cpu()
            total, squares = (s, q) if total is None else (total + s, squares + q)
        n = (rows - 2 * c) * (cols - 2 * c)
        if total is None or min(rows, cols) - 2 * c < self.patch_size:
            raise ValueError(
                f"the image ({height} x {width}) is too small for MLF-SC: its feature grid ({rows} x {cols}) "
                f"minus the cut-off leaves less than one {self.patch_size} x {self.patch_size} patch"
            )
        mean = total / n
        var = ((squares - n * mean.square()) / max(n - 1, 1)).clamp_min(0)
        return mean.float().reshape(1, -1, 1, 1).to(self.device), var.sqrt().float().reshape(1, -1, 1, 1).to(
            self.device
        )

    def _window_levels(self, window: torch.Tensor) -> torch.Tensor:
        """(N, C, ceil(h / 8), ceil(w / 8)): the raw levels of a window; VGG's pooling floors, so a
        window whose side is not a multiple of the stride (the image's last) gets one more cell,
        a repeat of its neighbour, which the cut-off and the map's cropping never use as data."""
        levels = self.raw_levels(window)
        stride = max(self._layer_strides().values())
        want = (-(-window.shape[-2] // stride), -(-window.shape[-1] // stride))
        extra = (want[0] - levels.shape[-2], want[1] - levels.shape[-1])
        return F.pad(levels, (0, extra[1], 0, extra[0]), mode="replicate") if any(extra) else levels

    def _window_outputs(self, mean: torch.Tensor, std: torch.Tensor):
        """The tiled scorer's function: a window's (N, 1 + C, h, w) cell outputs, the map's cell
        values and, at each cell where a patch starts, that patch's squared error per channel (NaN
        elsewhere). Every window is treated as a whole image (its own cut-off and patch grid);
        the halo keeps the core's cells away from the difference."""

        def outputs(window: torch.Tensor) -> torch.Tensor:
            stride = max(self._layer_strides().values())
            valid = (window.shape[-2] // stride, window.shape[-1] // stride)  # cells VGG produces
            levels = self._window_levels(window)
            cut = self._cut(levels[..., : valid[0], : valid[1]])
            errors, cell_map = self._code(self._standardised(cut, mean, std))  # (C, N, ny, nx)
            n, grid = window.shape[0], levels.shape[-2:]
            out = torch.full((n, 1 + errors.shape[0], *grid), math.nan, device=levels.device)
            full = self._full_grid(cell_map, valid)
            out[:, 0] = F.pad(full[:, None], (0, grid[1] - valid[1], 0, grid[0] - valid[0]), mode="replicate")[:, 0]
            c, s = self.cutoff, self.patch_stride
            ny, nx = errors.shape[2:]
            out[:, 1:, c : c + s * ny : s, c : c + s * nx : s] = errors.permute(1, 0, 2, 3)
            return out

        return outputs

    def _tiled_scorer(self, reader, geometry, tile, progress):
        mean, std = self._image_statistics(reader, geometry, tile, progress)
        k = int(self.top_k)
        best: list[torch.Tensor] = []  # (C, <= k) running largest patch errors per channel

        def observe(origin, core: torch.Tensor) -> None:
            errors = core[1:].flatten(1)
            found = ~torch.isnan(errors[0])
            if found.any():
                merged = torch.cat([*best, errors[:, found]], dim=1)
                best[:] = [merged.topk(min(k, merged.shape[1]), dim=1).values]

        def merge() -> None:  # tiles divided among processes: the top k of the union of each one's top k
            parts = [p for p in distributed.all_gather_objects(best[0].cpu() if best else None) if p is not None]
            if parts:
                merged = torch.cat(parts, dim=1).to(self.device)
                best[:] = [merged.topk(min(k, merged.shape[1]), dim=1).values]

        def image_score(outputs, patch_valid) -> float:
            return float(best[0].double().sum()) if best else math.nan

        return TiledScorer(self._window_outputs(mean, std), image_score, stitched=1, observe=observe, merge=merge)

    def _fit_tiled(self, readers, tile: int, progress) -> int:
        """Native-resolution fit: per image, the standardisation's statistics in a first tiled
        pass, then each window's patches that start in its core fed to the learner, a few patch
        rows at a time, with the sampling keys of their places in the image's raster order."""
        geometry = self.tile_geometry()
        tile = geometry.rounded_tile(tile)
        stride, c, s, p = geometry.stride, self.cutoff, self.patch_stride, self.patch_size
        learner = keys = None
        count = 0
        for reader in readers:
            mean, std = self._image_statistics(reader, geometry, tile, progress)
            ny, nx = self._patch_counts(reader.shape, stride)
            if learner is None:
                learner, keys = self._new_learner(self.feature_channels())
                if keys is not None and distributed.is_distributed():  # the earlier processes' images' keys
                    _skip_draws(keys, self.__dict__.get("_keys_before", 0))
            image_keys = None if keys is None else torch.rand(ny * nx, generator=keys, dtype=torch.float64)
            for (y0, y1, x0, x1), (ya, _, xa, _), pixels in tile_windows(
                reader,
                tile=tile,
                halo=geometry.halo,
                align=geometry.align,
                same_padding=geometry.same_padding,
                progress=progress,
            ):
                window = pixels[None].to(self.device)
                valid = (window.shape[-2] // stride, window.shape[-1] // stride)
                cut = self._cut(self.raw_levels(window)[..., : valid[0], : valid[1]])
                grid = self._patch_grid(self._standardised(cut, mean, std))  # (1, C, wy, wx, p, p)
                # The window's patch j starts at image cell ya / stride + c + s j; keep those
                # starting in the core (rows and columns of the image's patch grid).
                first_y, first_x = (ya // stride + c), (xa // stride + c)
                rows = [j for j in range(grid.shape[2]) if y0 // stride <= first_y + s * j < -(-y1 // stride)]
                cols = [j for j in range(grid.shape[3]) if x0 // stride <= first_x + s * j < -(-x1 // stride)]
                if not rows or not cols:
                    continue
                step = max(1, _CHUNK_VALUES // (grid.shape[1] * len(cols) * p * p))
                col_index = torch.tensor(cols, device=grid.device)
                for r0 in range(0, len(rows), step):
                    part_rows = rows[r0 : r0 + step]
                    part = grid[:, :, part_rows[0] : part_rows[-1] + 1].index_select(3, col_index)
                    signals = self._as_signals(part)
                    if image_keys is None:
                        learner.partial_fit(signals)
                        continue
                    gy = torch.tensor([(first_y + s * j - c) // s for j in part_rows])
                    gx = torch.tensor([(first_x + s * j - c) // s for j in cols])
                    learner.add(signals, image_keys[(gy[:, None] * nx + gx[None, :]).flatten()])
            count += 1
        self._finish_learning(learner)
        return count

    def _patch_counts(self, shape: tuple[int, int, int], stride: int) -> tuple[int, int]:
        """Patch rows and columns of an image of ``shape`` (C, H, W) at feature ``stride``: the
        one count the tiled fit's keys and ``_tiled_keys`` share (zero for an image too small)."""
        c, s, p = self.cutoff, self.patch_stride, self.patch_size
        return tuple(max(0, (side // stride - 2 * c - p) // s + 1) for side in shape[1:])

    def _tiled_keys(self, shape: tuple[int, int, int]) -> int:
        """One sampling key per patch of an image of ``shape`` (C, H, W) (see AnomalyModel.draws_tiled_keys)."""
        if self.dictionary_fit != "sklearn_lasso":
            return 0
        ny, nx = self._patch_counts(shape, self.tile_geometry().stride)
        return ny * nx


__all__ = ["MLFSC", "LEVELS", "DICTIONARY_FITS", "MAP_MODES"]


def _skip_draws(generator: torch.Generator, count: int) -> None:
    """Advances ``generator`` past ``count`` float64 draws (a million at a time)."""
    while count > 0:
        step = min(count, 1 << 20)
        torch.rand(step, generator=generator, dtype=torch.float64)
        count -= step

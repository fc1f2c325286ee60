"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Locally aware patch features of two middle layers form a memory bank of normal patches, reduced
by greedy k-center selection; a test patch scores its distance to the nearest bank patch, an image
the reweighted score of its worst patch (the paper's Eq. 7).

Fitting streams: each batch's patch features are kept as one chunk with their random projection
beside them; the coreset is chosen on the projections (``fastad.ops.kcenter_greedy``), and the
chosen rows are copied chunk by chunk into the bank, each chunk freed once read, so the full set of
training patches never exists twice. Scoring is ``fastad.ops.knn`` on the model's device, with the
bank prepared once (``fastad.ops.knn_prepare``) since every image searches it twice.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed, ops
from .._versions import in_place_version
from ..checks import check_float, check_int, check_state_tensor
from ..features import BACKBONES
from ..highres import TileGeometry, window_around
from ..tiling import tiled_apply
from .base import register_method
from .feature_model import BANK_DTYPES, FeatureModel, bank_dtype_of

EMBEDDINGS = ("per_layer", "concatenated")


@register_method("patchcore")
class PatchCore(FeatureModel):
    """PatchCore with the paper's defaults; parity switches are named parameters.

    Parameters (besides :class:`FeatureModel`'s and :class:`AnomalyModel`'s):
        neighbourhood: side p of the local neighbourhood around each position (p x p, stride 1,
            zero padding at the borders, as the authors' unfold); 1 turns it off.
        embedding: how a position's neighbourhoods of the layers become one vector.
            ``"per_layer"`` (the authors' code, amazon-science/patchcore-inspection): each layer's
            p x p x C neighbourhood, flattened channel-major, is average-pooled to ``layer_dim``
            values, deeper layers upsampled to the first layer's grid, and the layers' vectors,
            concatenated, pooled to ``embed_dim``, so every layer gets an equal share.
            ``"concatenated"`` (earlier fastad): each layer averaged over its p x p neighbourhood,
            the layers concatenated and pooled once to ``embed_dim`` (the deeper, wider layer
            then takes most of the dimensions); a backbone with fewer channels keeps them all.
        layer_dim: the per-layer width of ``"per_layer"`` (1024: the authors' pretrain_embed_dimension).
        embed_dim: the patch features' width (1024: the authors' target_embed_dimension).
        coreset_ratio: share of training patches kept in the bank, in (0, 1]; 1 keeps them all.
        projection_dim: the coreset is chosen on a Gaussian random projection to this many dims
            (0 or None: on the patches themselves); the bank keeps the full patches.
        seed: seeds the projection and the coreset's first patch.
        num_neighbours: b of Eq. 7, the bank neighbours of the nearest patch used to reweight.
        reweight: the paper's image score (True) or the plain maximum patch score (False).
        squared: patch scores as squared L2 distances (as faiss returns them in the authors'
            code) instead of plain L2 (the paper's formula).
        bank_dtype: "float32", "float16" or "bfloat16" storage of the bank (distances are
            computed in float32 either way).
        shard_bank: under a torch.distributed group, leave the bank split across the processes
            (each keeps the chosen patches of its own images, so no process ever holds the whole
            bank) instead of giving every process all of it. ``predict`` then has to be called by
            every process with the same images: each searches its shard and the nearest patches
            are merged (``fastad.distributed.knn_across_shards``), so the scores equal one
            process's. ``save`` writes one file per process plus an index file; loading the index
            in a group of the same size gives each process its shard, anywhere else the whole bank.

    Learned: ``bank_`` (K, D) patches; ``coreset_radius_`` the largest distance (in the projected
    space) from a training patch to the bank; ``n_patches_`` the training patches seen. A bank
    left split across processes (``shard_bank``) also has ``bank_rows_`` (this process's rows of
    the whole bank, ascending) and ``bank_size_`` (the whole bank's K).
    """

    fits_across_processes = True  # see fastad.distributed
    fits_tiled_across_processes = True  # fastad.highres.fit_large: each process its block of images, one coreset

    default_strides: ClassVar[tuple[int, ...]] = (8, 16)

    def __init__(
        self,
        *,
        neighbourhood: int = 3,
        embedding: str = "per_layer",
        layer_dim: int = 1024,
        embed_dim: int = 1024,
        coreset_ratio: float = 0.1,
        projection_dim: int | None = 128,
        seed: int = 0,
        num_neighbours: int = 9,
        reweight: bool = True,
        squared: bool = False,
        bank_dtype: str = "float32",
        shard_bank: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.neighbourhood = neighbourhood
        self.embedding = embedding
        self.layer_dim = layer_dim
        self.embed_dim = embed_dim
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.seed = seed
        self.num_neighbours = num_neighbours
        self.reweight = reweight
        self.squared = squared
        self.bank_dtype = bank_dtype
        self.shard_bank = shard_bank

    def _check_params(self) -> None:
        super()._check_params()
        for name in ("neighbourhood", "layer_dim", "embed_dim", "num_neighbours"):
            check_int(getattr(self, name), name)
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {', '.join(map(repr, EMBEDDINGS))}, got {self.embedding!r}")
        check_int(self.seed, "seed", minimum=0)
        if self.neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood must be odd (a centred p x p window), got {self.neighbourhood}")
        if not (isinstance(self.coreset_ratio, (int, float)) and 0.0 < float(self.coreset_ratio) <= 1.0):
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio!r}")
        if self.projection_dim is not None:
            check_int(
                self.projection_dim, "projection_dim", minimum=0, meaning="or None: select on the patches themselves"
            )
        bank_dtype_of(self.bank_dtype)  # raises on an unknown name
        if not isinstance(self.shard_bank, bool):
            raise TypeError(f"shard_bank must be True or False, got {self.shard_bank!r}")

    def _check_state(self) -> None:
        super()._check_state()
        dim = self.embedding_width()
        # Any bank dtype fastad writes: set_params(bank_dtype=...) after fit changes the parameter,
        # not the bank, and such a model must still load.
        split = hasattr(self, "bank_rows_") or hasattr(self, "bank_size_")
        bank = getattr(self, "bank_", None)
        # A process's shard of a split bank may be empty; a whole bank has K >= 1 rows.
        rows_here = bank.shape[0] if split and isinstance(bank, torch.Tensor) and bank.dim() == 2 else "K"
        bank = check_state_tensor("bank_", bank, tuple(BANK_DTYPES.values()), (rows_here, dim))
        n = check_int(getattr(self, "n_patches_", None), "n_patches_")
        if bank.shape[0] > n:
            raise ValueError(f"bank_ holds {bank.shape[0]} patches, more than the {n} training patches (n_patches_)")
        radius = getattr(self, "coreset_radius_", None)
        check_float(radius, "coreset_radius_", minimum=0.0)
        if split:
            size = check_int(getattr(self, "bank_size_", None), "bank_size_")
            rows = check_state_tensor("bank_rows_", getattr(self, "bank_rows_", None), (torch.int64,), (bank.shape[0],))
            if size > n or (
                rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= size or not bool((rows.diff() > 0).all()))
            ):
                raise ValueError(
                    f"bank_rows_ must be ascending rows of the whole bank (0 .. bank_size_ - 1 = {size - 1}) "
                    f"and bank_size_ at most n_patches_ ({n})"
                )

    # -- patch features --------------------------------------------------------------------------

    def embedding_width(self) -> int:
        """D, the width of :meth:`patch_features` (from the layer table, no forward)."""
        if self.embedding == "per_layer":
            return int(self.embed_dim)
        return min(self.feature_channels(), int(self.embed_dim))

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features (B, h, w, D) float32 of a batch on the model's device, on
        the first layer's grid (``embedding`` says how the layers combine)."""
        features = self._features(images)
        layers = self.feature_layers()
        strides = self._layer_strides()
        p = self.neighbourhood
        grid = features[layers[0]].shape[-2:]
        maps = []
        for layer in layers:
            f = features[layer]
            if self.embedding == "per_layer":
                f = _pooled_neighbourhoods(f, p, int(self.layer_dim))
            elif p > 1:
                f = F.avg_pool2d(
                    f, p, stride=1, padding=p // 2
                )  # zeros beyond the border count, as in the authors' unfold
            if f.shape[-2:] != grid:
                # By the exact ratio of the strides, then cropped: the same as resizing to the grid
                # whenever the image's sides are multiples of the deeper stride, and independent of
                # the image's size otherwise, so that tiles of a large image give the untiled values.
                # (The authors upsample the neighbourhoods before pooling them; both steps are
                # linear, one across positions, one within a position, so the order is free.)
                ratio = strides[layer] // strides[layers[0]]
                f = F.interpolate(f, scale_factor=ratio, mode="bilinear", align_corners=False)[
                    ..., : grid[0], : grid[1]
                ]
            maps.append(f)
        patches = torch.cat(maps, dim=1).permute(0, 2, 3, 1)  # (B, h, w, C)
        b, h, w, c = patches.shape
        if self.embedding == "per_layer" or c > self.embed_dim:
            patches = F.adaptive_avg_pool1d(patches.reshape(b * h * w, 1, c), int(self.embed_dim)).reshape(b, h, w, -1)
        return patches.contiguous()

    # -- native resolution (fastad.highres) ------------------------------------------------------

    def tile_geometry(self):
        """Patch map at the first layer's stride; windows aligned to the deepest layer's stride;
        the halo is the measured receptive field of the whole patch pipeline (backbone,
        neighbourhood averaging, upsampling), plus one aligned cell of margin. Measured once per
        process and pipeline on random inputs (a check of where outputs stop changing, see
        ``fastad.tiling.receptive_field`` and ``fastad.highres.measured_halo``)."""
        strides = self._layer_strides()
        stride, align = min(strides.values()), max(strides.values())

        def scores(images):
            return self.patch_features(images).norm(dim=-1)[:, None]

        halo = self._measured_halo(
            scores, stride, align, self.neighbourhood, self.embedding, self.layer_dim, self.embed_dim
        )
        return TileGeometry(stride=stride, align=align, halo=halo, same_padding=BACKBONES[self.backbone].same_padding)

    def _tiled_scorer(self, reader, geometry, tile, progress):
        return self._tile_outputs, lambda outputs, valid: self._tile_image_score(outputs, reader, geometry, valid)

    def _tile_outputs(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 2, h, w) float64: each patch's score and the index of its nearest bank patch
        (float64 holds any bank index exactly)."""
        patches = self.patch_features(images)
        b, h, w, d = patches.shape
        if d != self.bank_.shape[1]:
            raise ValueError(
                f"patch features have {d} dims but the bank has {self.bank_.shape[1]}; "
                "were the layers changed after fit?"
            )
        dist, index = self._nearest(patches.reshape(-1, d).to(self.bank_.dtype), 1, squared=self.squared)
        return torch.stack([dist[:, 0].reshape(b, h, w).double(), index[:, 0].reshape(b, h, w).double()], dim=1)

    def _tile_image_score(self, outputs, reader, geometry, patch_valid=None) -> float:
        """Eq. 7 at the image's worst patch (the first maximum in row-major order, as ``argmax``
        on the untiled map), whose feature is recomputed from the one window around it; patches
        where ``patch_valid`` is False (no data in the image) are not candidates."""
        scores = torch.from_numpy(np.ascontiguousarray(outputs[0]))
        if not self.reweight:
            return None  # predict's score then: the final map's maximum
        if patch_valid is not None:
            if not patch_valid.any():
                return math.nan
            scores = scores.masked_fill(torch.from_numpy(~patch_valid), -math.inf)
        flat = int(scores.flatten().argmax())
        cy, cx = divmod(flat, scores.shape[1])
        s_star = scores[cy, cx]
        _, height, width = reader.shape
        y0, y1, x0, x1 = window_around((cy * geometry.stride, cx * geometry.stride), (height, width), geometry)
        window = reader.read(y0, y1, x0, x1)[None].to(self.device, torch.float32)
        patch = self.patch_features(window)[
            0, (cy * geometry.stride - y0) // geometry.stride, (cx * geometry.stride - x0) // geometry.stride
        ]
        nearest = torch.tensor([[int(outputs[1, cy, cx])]], device=self.device)
        return float(self._reweighted(patch[None, None], s_star.reshape(1, 1).to(self.device), nearest)[0])

    # -- fit ------------------------------------------------------------------------------------------

    def _projection(self, dim: int) -> torch.Tensor | None:
        """(D, projection_dim) Gaussian matrix, entries N(0, 1/projection_dim), from ``seed``."""
        if not self.projection_dim or self.projection_dim >= dim or self.coreset_ratio >= 1.0:
            return None
        gen = torch.Generator().manual_seed(self.seed)
        matrix = torch.randn(dim, self.projection_dim, generator=gen) / self.projection_dim**0.5
        return matrix.to(self.device)

    def _fit_batches(self, batches) -> None:
        self._fit_patches(self.patch_features(images).flatten(0, 2) for images in batches)

    def _fit_tiled(self, readers, tile: int, progress) -> int:
        """Native-resolution fit (``fastad.highres.fit_large``): each image's patch features are
        computed tile by tile (equal to the untiled ones), one chunk of the bank per image."""
        geometry = self.tile_geometry()
        count = [0]

        def chunks():
            for reader in readers:
                features = tiled_apply(
                    lambda x: self.patch_features(x).permute(0, 3, 1, 2),
                    reader,
                    **geometry.tiling_args(tile, device=self.device, progress=progress),
                )
                count[0] += 1
                yield torch.from_numpy(features).flatten(1).T.to(self.device)  # (h w, D), row-major positions

        self._fit_patches(chunks())
        return count[0]

    def _fit_patches(self, patch_chunks) -> None:
        """The bank from (n, D) chunks of patch features: kept chunk by chunk with their random
        projection, the coreset chosen on the projections, the chosen rows gathered."""
        dtype = bank_dtype_of(self.bank_dtype)
        chunks: list[torch.Tensor] = []
        projected: list[torch.Tensor] = []
        projection = None
        for patches in patch_chunks:
            if not chunks:
                projection = self._projection(patches.shape[1])
            if projection is not None:
                projected.append(patches @ projection)
            chunks.append(patches.to(dtype))
        if not chunks:
            return
        n_local = sum(chunk.shape[0] for chunk in chunks)
        several = distributed.is_distributed()
        # Under torch.distributed each process holds the patches of its block of images, the
        # blocks in image order: the coreset is chosen across all of them, as one process would.
        counts = distributed.all_gather_objects(n_local)
        offset, n = sum(counts[: distributed.world()[0]]), sum(counts)
        k = max(1, int(round(n * float(self.coreset_ratio))))
        if k >= n:
            selected = torch.arange(n) if several else None
            self.coreset_radius_ = 0.0
        else:
            space = torch.cat(projected) if projected else torch.cat(chunks).float()
            projected.clear()
            start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(self.seed)))
            select = distributed.kcenter_greedy if several else ops.kcenter_greedy
            selected, radii = select(space, k, start=start)
            del space
            self.coreset_radius_ = float(radii[-1])
        if several and self.shard_bank:
            # This process keeps the chosen rows of its own images, in selection order: the
            # whole bank's rows bank_rows_ (ascending), so the lowest-index tie rule carries over.
            mine = ((selected >= offset) & (selected < offset + n_local)).nonzero().flatten()
            self.bank_ = _gather_rows(chunks, selected[mine] - offset, n_local, dtype, self.device)
            self.bank_rows_ = mine
            self.bank_size_ = int(selected.shape[0])
        elif several:
            self.bank_ = _bank_across_processes(chunks, selected, offset, n_local, dtype, self.device)
        else:
            self.bank_ = _gather_rows(chunks, selected, n, dtype, self.device)
        self.n_patches_ = n
        self._prepared_bank()  # now rather than in the first prediction

    # -- the bank, whole or split across processes ------------------------------------------------

    def _bank_is_split(self) -> bool:
        """Whether this process holds only its shard of the bank (``shard_bank`` under a group)."""
        if not hasattr(self, "bank_rows_"):
            return False
        if not distributed.is_distributed():
            raise RuntimeError(
                f"this PatchCore's bank of {self.bank_size_} patches is split across processes "
                f"(shard_bank) and this process holds {self.bank_.shape[0]} of them, but no process "
                "group is running: predict inside the group that fitted it, or save it there and load "
                "the model file in one process (AnomalyModel.load joins the parts)"
            )
        return True

    def _split_state_names(self) -> tuple[str, ...]:
        return ("bank_", "bank_rows_", "bank_size_") if self._bank_is_split() else ()

    @classmethod
    def _joined_state(cls, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole bank, rows in the whole bank's order, from every process's shard."""
        for part in parts:
            if not isinstance(part.get("bank_"), torch.Tensor) or not isinstance(part.get("bank_rows_"), torch.Tensor):
                raise ValueError("a part of the split bank has no bank_ / bank_rows_ tensors")
        rows = torch.cat([part["bank_rows_"] for part in parts])
        sizes = {part.get("bank_size_") for part in parts}
        if (
            rows.dtype != torch.int64
            or len(sizes) != 1
            or not torch.equal(rows.sort().values, torch.arange(rows.numel()))
            or rows.numel() != next(iter(sizes))
        ):
            raise ValueError("the parts' bank rows do not make up the whole bank exactly once")
        bank = torch.cat([part["bank_"] for part in parts])
        return {"bank_": bank[rows.argsort()]}

    def _bank_size(self) -> int:
        return int(self.bank_size_) if hasattr(self, "bank_rows_") else int(self.bank_.shape[0])

    def _nearest(self, query: torch.Tensor, k: int, *, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``ops.knn`` of ``query`` against the whole bank (also when it is split across processes)."""
        if self._bank_is_split():
            return distributed.knn_across_shards(
                query, self.bank_, self.bank_rows_, k, squared=squared, prepared=self._prepared_bank()
            )
        return ops.knn(query, self.bank_, k, squared=squared, prepared=self._prepared_bank())

    def _bank_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` of the whole bank, float32."""
        if self._bank_is_split():
            return distributed.rows_across_shards(indices, self.bank_, self.bank_rows_)
        return self.bank_[indices].float()

    def _prepared_bank(self) -> torch.Tensor:
        """``ops.knn_prepare(bank_)``, made again only when ``bank_`` is replaced or changed in
        place; a cache, never saved. A bank made in inference mode (a model loaded inside
        ``torch.inference_mode()``) has no version to watch, so it is prepared at every call."""
        bank = self.bank_
        if bank.shape[0] == 0:  # a process whose shard of a split bank is empty: nothing to search
            return torch.empty(0, dtype=torch.uint8, device=bank.device)
        version = in_place_version(bank)
        cached = self.__dict__.get("_prepared_cache")
        if cached is not None and version is not None and cached[0]() is bank and cached[1] == version:
            return cached[2]
        prepared = ops.knn_prepare(bank)
        self.__dict__["_prepared_cache"] = (weakref.ref(bank), version, prepared)
        return prepared

    # -- score ---------------------------------------------------------------------------------------

    def _score_batch(self, images: torch.Tensor):
        patches = self.patch_features(images)
        b, h, w, d = patches.shape
        if d != self.bank_.shape[1]:
            raise ValueError(
                f"patch features have {d} dims but the bank has {self.bank_.shape[1]}; "
                "were the layers changed after fit?"
            )
        query = patches.reshape(b * h * w, d)
        dist, index = self._nearest(query.to(self.bank_.dtype), 1, squared=self.squared)
        scores = dist[:, 0].reshape(b, h * w)
        patch_map = scores.reshape(b, h, w)
        if not self.reweight:
            return patch_map, None
        return patch_map, self._reweighted(query.reshape(b, h * w, d), scores, index[:, 0].reshape(b, h * w))

    def _reweighted(self, query: torch.Tensor, scores: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Eq. 7: s = (1 - exp(s*) / sum over the b bank neighbours m of m* of exp(||m_test* - m||)) s*,
        with m_test* the worst patch, m* its nearest bank patch and s* their distance. The sum's
        first term is m* itself, so the weight is one minus a softmax entry (computed stably)."""
        worst = scores.argmax(dim=1)  # (B,)
        rows = torch.arange(scores.shape[0], device=scores.device)
        s_star = scores[rows, worst]
        m_test = query[rows, worst]  # (B, D)
        m_star = nearest[rows, worst]  # (B,)
        b = min(self.num_neighbours, self._bank_size())
        _, support = self._nearest(self._bank_rows(m_star).to(self.bank_.dtype), b)  # (B, b), m* first
        neighbours = self._bank_rows(support)  # (B, b, D) float32
        distances = (neighbours - m_test[:, None, :].float()).norm(dim=2)
        if self.squared:
            distances = distances.square()
        # The support's first entry is m* itself (distance 0 to itself), so the softmax's first
        # term is exp(s*) over the sum; recompute it from m* to be independent of near-ties.
        distances[:, 0] = s_star
        weight = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return weight * s_star


def _pooled_neighbourhoods(features: torch.Tensor, p: int, width: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, width, h, w): each position's p x p x C neighbourhood (zero padded),
    flattened channel-major as ``F.unfold`` lays it out, average-pooled to ``width`` values
    (``adaptive_avg_pool1d``: consecutive runs averaged; a shorter vector has its values repeated).
    A few images at a time: the unfolded neighbourhoods are p^2 times the features."""
    b, c, h, w = features.shape
    step = max(1, 2**25 // (c * p * p * h * w))
    parts = []
    for start in range(0, b, step):
        chunk = F.unfold(features[start : start + step], p, padding=p // 2)  # (n, C p p, h w)
        n = chunk.shape[0]
        pooled = F.adaptive_avg_pool1d(chunk.transpose(1, 2).reshape(n * h * w, 1, -1), width)
        parts.append(pooled.reshape(n, h, w, width).permute(0, 3, 1, 2))
    return torch.cat(parts)


def _bank_across_processes(
    chunks: list[torch.Tensor], selected: torch.Tensor, offset: int, n_local: int, dtype: torch.dtype, device: str
) -> torch.Tensor:
    """Every process given the chosen rows (global indices ``selected``) in selection order, each
    contributed by the process that holds it: this one holds rows offset .. offset + n_local."""
    import torch.distributed as dist

    mine = (selected >= offset) & (selected < offset + n_local)
    local_rows = _gather_rows(chunks, selected[mine] - offset, n_local, dtype, "cpu")
    # Each row comes from one process and zeros from the others; float32 holds every bank dtype
    # exactly, and x + 0 = x, so the sum is the rows themselves.
    bank = torch.zeros(selected.shape[0], local_rows.shape[1], dtype=torch.float32)
    bank[mine] = local_rows.float()
    dist.all_reduce(bank)
    return bank.to(device, dtype)


def _gather_rows(
    chunks: list[torch.Tensor], selected: torch.Tensor | None, n: int, dtype: torch.dtype, device: str
) -> torch.Tensor:
    """The bank: rows ``selected`` (or all) of the chunks' concatenation, in selection order,
    copied chunk by chunk into one preallocated tensor; each chunk is released once copied, so
    memory peaks at the bank plus one chunk beyond the chunks themselves."""
    d = chunks[0].shape[1]
    if selected is None:
        bank = torch.empty(n, d, dtype=dtype, device=device)
        offset = 0
        while chunks:
            chunk = chunks.pop(0)
            bank[offset : offset + chunk.shape[0]] = chunk
            offset += chunk.shape[0]
        return bank
    selected = selected.to(device)
    bank = torch.empty(selected.shape[0], d, dtype=dtype, device=device)
    offset = 0
    while chunks:
        chunk = chunks.pop(0)
        inside = (selected >= offset) & (selected < offset + chunk.shape[0])
        where = inside.nonzero().flatten()
        if where.numel():
            bank[where] = chunk[selected[where] - offset]
        offset += chunk.shape[0]
    return bank

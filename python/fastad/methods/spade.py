"""SPADE: Semantic Pyramid Anomaly Detection (Cohen & Hoshen, "Sub-Image Anomaly Detection with
Deep Pyramid Correspondences", 2020).

Two stages, both plain nearest-neighbour search on pretrained features:

* image level: the ``k_images`` training images nearest to the test image by the Euclidean
  distance of the deepest (stride-32) layer's globally average-pooled features. The image score
  is the mean distance to them;
* pixel level: every position of every map layer (``layer1..layer3`` on a ResNet, i.e. strides
  4, 8 and 16) is compared with all positions of those same neighbours at that layer; its score
  is the distance to the nearest one (the mean of the ``k_features`` nearest). Each per-layer map
  is upsampled to the input's resolution and the layers' maps are averaged (as the reference
  implementations do, ``layer_maps="to_image"``; ``"to_first_layer"``: averaged on the first
  layer's grid, then upsampled); the Gaussian blur is the base class's.

Restricting the pixel gallery to the test image's own neighbours is what keeps the comparison to
aligned, similar images; it is also why the whole per-layer training feature maps are kept
(N x C x h x w per layer), the method's memory cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .. import distributed
from ..checks import check_choice, check_int, check_state_tensor, keys_of
from ..features import BACKBONES, layers_at_strides
from ..highres import TileGeometry
from ..ops import knn, knn_prepare
from ..tiling import tiled_apply, tiled_sum
from .base import register_method
from .feature_model import BANK_DTYPES, FeatureModel, bank_dtype_of

_IMAGE_SCORES = ("knn", "max")
_LAYER_MAPS = ("to_image", "to_first_layer")
# The image-level retrieval uses the network's last stage, whatever its name on each backbone.
_IMAGE_STRIDE = 32


@register_method("spade")
class SPADE(FeatureModel):
    """SPADE with the paper's defaults (``backbone="wide_resnet50_2"``, K = 50, kappa = 1).

    Parameters (besides :class:`FeatureModel`'s and :class:`AnomalyModel`'s, passed as ``**common``):

    * ``k_images``: K, how many nearest training images form each test image's gallery. Clipped to
      the number of training images (with fewer than K, every training image is a neighbour);
    * ``k_features``: kappa, how many nearest gallery features a position's score averages
      (1 = the distance to the nearest, as in the paper);
    * ``image_score``: ``"knn"`` (the paper: mean distance to the K images) or ``"max"`` (the
      maximum of the blurred anomaly map);
    * ``bank_dtype``: ``"float32"``, or ``"float16"`` / ``"bfloat16"`` to halve the memory of the
      stored training feature maps (distances are still accumulated in float32);
    * ``layer_maps``: ``"to_image"`` (each layer's distance map upsampled bilinearly to the image,
      then the layers averaged: the reference code) or ``"to_first_layer"`` (averaged on the first
      layer's grid, then upsampled: earlier fastad, a quarter of the memory at stride 4 for tiles).

    Layers: ``layers`` names the map layers (default: the strides 4, 8, 16: ``layer1..layer3`` on
    ResNets, ``block1``/``block2``/``block4`` on EfficientNet-Lite0); the image layer is always
    the deepest stride-32 layer (``layer4``, ``head``), see :meth:`image_layer`.

    Learned: ``features_`` ``{map layer: (N_train, C, h, w)}`` in ``bank_dtype`` and ``pooled_``
    (N_train, C_image) float32, on the model's device. All training images must have one size.
    """

    default_strides: ClassVar[tuple[int, ...]] = (4, 8, 16)
    fits_across_processes = True  # each process extracts its block of images; all get the whole gallery
    fits_tiled_across_processes = True  # the same for fastad.highres.fit_large

    def __init__(
        self,
        *,
        k_images: int = 50,
        k_features: int = 1,
        image_score: str = "knn",
        bank_dtype: str = "float32",
        layer_maps: str = "to_image",
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.k_images = k_images
        self.k_features = k_features
        self.image_score = image_score
        self.bank_dtype = bank_dtype
        self.layer_maps = layer_maps

    # -- layers ----------------------------------------------------------------------------------

    def map_layers(self) -> list[str]:
        """The layers whose nearest-neighbour distances make the anomaly map, in network order."""
        return super().feature_layers()

    def image_layer(self) -> str:
        """The layer whose pooled features choose the nearest training images: the deepest layer
        at stride 32."""
        return layers_at_strides(self.backbone, [_IMAGE_STRIDE])[0]

    def feature_layers(self) -> list[str]:
        """Every layer extracted: the map layers and the image layer, in network order."""
        map_layers = self.map_layers()  # checks the backbone and the layer names first
        order = list(BACKBONES[self.backbone].layer_info)
        return sorted({*map_layers, self.image_layer()}, key=order.index)

    def _check_params(self) -> None:
        super()._check_params()
        check_int(self.k_images, "k_images", meaning="the number of nearest training images")
        check_int(self.k_features, "k_features", meaning="the number of nearest gallery features")
        check_choice(self.image_score, "image_score", _IMAGE_SCORES)
        check_choice(self.layer_maps, "layer_maps", _LAYER_MAPS)
        bank_dtype_of(self.bank_dtype)  # raises on an unknown name

    def _check_state(self) -> None:
        super()._check_state()
        info = BACKBONES[self.backbone].layer_info
        n = self.n_train_images_  # one pooled row and one map per training image
        check_state_tensor("pooled_", getattr(self, "pooled_", None), torch.float32, (n, info[self.image_layer()][0]))
        features, layers = getattr(self, "features_", None), self.map_layers()
        if not isinstance(features, dict) or set(features) != set(layers):
            raise ValueError(f"features_ must be a dict of the map layers {layers}, got {keys_of(features)}")
        # As PatchCore's bank: whatever bank_dtype was at fit, but one for every layer.
        dtype = tuple(BANK_DTYPES.values())
        for layer in layers:
            check_state_tensor(f"features_[{layer!r}]", features[layer], dtype, (n, info[layer][0], "h", "w"))
            if features[layer].dtype != features[layers[0]].dtype:
                raise ValueError(
                    f"features_[{layer!r}] is {features[layer].dtype} but features_[{layers[0]!r}] is "
                    f"{features[layers[0]].dtype}: every layer's maps have the bank's one dtype"
                )

    # -- fit -------------------------------------------------------------------------------------

    def _fit_batches(self, batches: Iterator[torch.Tensor]) -> None:
        map_layers, image_layer = self.map_layers(), self.image_layer()
        dtype = bank_dtype_of(self.bank_dtype)
        chunks: dict[str, list[torch.Tensor]] = {layer: [] for layer in map_layers}
        pooled: list[torch.Tensor] = []
        size: tuple[int, int] | None = None
        for images in batches:
            here = (int(images.shape[-2]), int(images.shape[-1]))
            if size is None:
                size = here
            elif here != size:
                raise ValueError(
                    f"SPADE needs training images of one size, got {size[0]}x{size[1]} and then {here[0]}x{here[1]}; "
                    "resize them (e.g. with the model's transform(), resize=..., crop=...)"
                )
            features = self._features(images)
            pooled.append(features[image_layer].mean(dim=(2, 3)))
            for layer in map_layers:
                chunks[layer].append(features[layer].to(dtype))  # no copy when already the dtype
            del features  # the deep layer's full map is not kept
        if distributed.is_distributed():
            self._join_processes(pooled, chunks, map_layers)
            return
        if size is None:
            return  # the base class reports that there was nothing to fit on
        self.pooled_ = torch.cat(pooled)
        features_: dict[str, torch.Tensor] = {}
        for layer in map_layers:
            # One layer at a time, its chunks freed as soon as they are joined: the peak is the
            # bank plus one layer, never two copies of the bank.
            features_[layer] = torch.cat(chunks.pop(layer))
        self.features_ = features_

    def _join_processes(self, pooled: list[torch.Tensor], chunks: dict[str, list[torch.Tensor]], map_layers) -> None:
        """Under torch.distributed: every process gets the features of all processes' blocks of
        images, in image order (the processes' order), as one process would have fitted them. A
        layer at a time, each process's chunks freed once sent."""
        joined = distributed.all_gather_rows(torch.cat(pooled) if pooled else None)
        if joined is None:
            return  # no process had an image: the base class reports it
        try:
            features_ = {
                layer: distributed.all_gather_rows(torch.cat(chunks.pop(layer)) if pooled else None)
                for layer in map_layers
            }
        except ValueError as exc:
            raise ValueError(f"SPADE needs training images of one size in every process: {exc}") from None
        self.pooled_, self.features_ = joined.to(self.device), {k: v.to(self.device) for k, v in features_.items()}

    # -- score -----------------------------------------------------------------------------------

    def _score_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        map_layers = self.map_layers()
        if set(self.features_) != set(map_layers):  # a model file gives the layers in name order
            raise ValueError(
                f"this SPADE was fitted on layers {list(self.features_)} but its layers are now {map_layers}; fit again"
            )
        features = self._features(images)
        pooled = features[self.image_layer()].mean(dim=(2, 3))
        k_images = min(self.k_images, self.pooled_.shape[0])
        image_distances, neighbours = knn(pooled, self.pooled_, k_images)

        layer_maps = [
            self._layer_distances(features[layer], self.features_[layer], neighbours, layer) for layer in map_layers
        ]
        image_scores = image_distances.mean(dim=1) if self.image_score == "knn" else None
        return self._combined(layer_maps, images.shape[-2:]), image_scores

    def _combined(self, layer_maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """The per-layer (B, h_l, w_l) maps (in map-layer order) averaged: ``"to_image"``, each
        upsampled to the images' ``size`` (B, H, W); ``"to_first_layer"``, on the first layer's
        grid. Maps are upsampled by the exact ratio of the strides and cropped: the same as
        resizing to the size when the image's sides are multiples of the strides, and independent
        of the image's size otherwise (so tiles give the untiled values)."""
        strides = self._layer_strides()
        layers = self.map_layers()
        to_image = self.layer_maps == "to_image"
        base = 1 if to_image else strides[layers[0]]
        grid = tuple(size) if to_image else layer_maps[0].shape[-2:]
        resized = []
        for layer, m in zip(layers, layer_maps, strict=True):
            ratio = strides[layer] // base
            if ratio > 1:
                m = F.interpolate(m[:, None], scale_factor=ratio, mode="bilinear", align_corners=False)[:, 0]
            resized.append(m[:, : grid[0], : grid[1]])
        return torch.stack(resized).mean(dim=0)

    # -- native resolution (fastad.highres) ------------------------------------------------------

    def _geometry_of(self, probe: str, layers: list[str], fn, stride: int | None = None) -> Any:
        """Tile geometry of ``fn`` (the ``probe`` named, built on ``layers``): output ``stride``
        (default the first layer's), aligned to the deepest, halo measured once per process and
        pipeline (``fastad.highres.measured_halo``)."""
        strides = self._layer_strides()
        stride, align = stride or strides[layers[0]], max(strides[layer] for layer in layers)
        return TileGeometry(
            stride=stride,
            align=align,
            halo=self._measured_halo(fn, stride, align, probe, tuple(layers), self.layer_maps),
            same_padding=BACKBONES[self.backbone].same_padding,
        )

    def tile_geometry(self):
        """The pixel maps tile: the combined map at stride 1 (``"to_image"``) or the first map
        layer's stride, windows aligned to the deepest map layer, the halo of the features and the
        upsampling of the maps."""

        def probe(images):  # the per-layer maps' dependence on the image, through the same combination
            features = self._features(images)
            return self._combined([features[layer].sum(dim=1) for layer in self.map_layers()], images.shape[-2:])[
                :, None
            ]

        stride = 1 if self.layer_maps == "to_image" else None
        return self._geometry_of("maps", self.map_layers(), probe, stride)

    def _pooled_geometry(self):
        def probe(images):
            return self._features(images)[self.image_layer()].sum(dim=1, keepdim=True)

        return self._geometry_of("pooled", [self.image_layer()], probe)

    def _fit_tiled(self, readers, tile, progress) -> int:
        """Native-resolution fit (``fastad.highres.fit_large``): each training image's map layers
        and pooled row are computed tile by tile (one pass per map layer and one for the pooled
        row, each equal to the untiled values); the images must share one size, as in ``fit``."""
        dtype = bank_dtype_of(self.bank_dtype)
        image_layer = self.image_layer()
        pooled_geometry = self._pooled_geometry()
        chunks: dict[str, list[torch.Tensor]] = {layer: [] for layer in self.map_layers()}
        pooled: list[torch.Tensor] = []
        size = None
        for reader in readers:
            if size is None:
                size = tuple(reader.shape[1:])
            elif tuple(reader.shape[1:]) != size:
                raise ValueError(
                    f"SPADE needs training images of one size, got {size[0]}x{size[1]} and then "
                    f"{reader.shape[1]}x{reader.shape[2]}"
                )
            total, count = tiled_sum(
                lambda x: self._features(x)[image_layer],
                reader,
                **pooled_geometry.tiling_args(tile, device=self.device, progress=progress),
            )
            pooled.append((total / count).to(device=self.device, dtype=torch.float32))
            for layer in chunks:
                geometry = self._layer_geometry(layer)
                maps = tiled_apply(
                    lambda x, layer=layer: self._features(x)[layer],
                    reader,
                    **geometry.tiling_args(tile, device=self.device, progress=progress),
                )
                chunks[layer].append(torch.from_numpy(maps)[None].to(device=self.device, dtype=dtype))
        if distributed.is_distributed():
            self._join_processes([torch.stack(pooled)] if pooled else [], chunks, list(chunks))
            return len(pooled)
        if size is None:
            return 0
        self.pooled_ = torch.stack(pooled)
        self.features_ = {layer: torch.cat(chunks.pop(layer)) for layer in list(chunks)}
        return len(pooled)

    def _layer_geometry(self, layer: str):
        def probe(images):
            return self._features(images)[layer].sum(dim=1, keepdim=True)

        return self._geometry_of("layer", [layer], probe)

    def _tiled_scorer(self, reader, geometry, tile, progress):
        """A first pass pools the image layer over the whole image (a sum over tiles, exact), picks
        the ``k_images`` nearest training images and gives the image score; then each map layer's
        gallery (every position of those images) is gathered and prepared once for all tiles."""
        if set(self.features_) != set(self.map_layers()):
            raise ValueError(
                f"this SPADE was fitted on layers {list(self.features_)} but its layers are now "
                f"{self.map_layers()}; fit again"
            )
        pooled_geometry = self._pooled_geometry()
        image_layer = self.image_layer()
        total, count = tiled_sum(
            lambda x: self._features(x)[image_layer],
            reader,
            **pooled_geometry.tiling_args(tile, device=self.device, progress=progress),
        )
        pooled = (total / count).to(device=self.device, dtype=torch.float32)[None]
        k_images = min(self.k_images, self.pooled_.shape[0])
        image_distances, neighbours = knn(pooled, self.pooled_, k_images)
        galleries = {}
        for layer in self.map_layers():
            bank = self.features_[layer]
            gallery = bank.permute(0, 2, 3, 1).index_select(0, neighbours[0]).reshape(-1, bank.shape[1]).contiguous()
            if self.k_features > gallery.shape[0]:
                raise ValueError(
                    f"k_features={self.k_features} exceeds the {gallery.shape[0]} gallery features of layer {layer!r}"
                )
            galleries[layer] = (gallery, knn_prepare(gallery))

        def fn(images: torch.Tensor) -> torch.Tensor:
            features = self._features(images)
            maps = []
            for layer in self.map_layers():
                query = features[layer]
                b, c, h, w = query.shape
                gallery, prepared = galleries[layer]
                rows = query.to(gallery.dtype).permute(0, 2, 3, 1).reshape(b * h * w, c)
                distances, _ = knn(rows, gallery, self.k_features, prepared=prepared)
                maps.append(distances.mean(dim=1).reshape(b, h, w))
            return self._combined(maps, images.shape[-2:])[:, None]

        score = float(image_distances.mean()) if self.image_score == "knn" else None
        return fn, lambda outputs, valid: score

    def _layer_distances(
        self, query: torch.Tensor, bank: torch.Tensor, neighbours: torch.Tensor, layer: str
    ) -> torch.Tensor:
        """Per-position score of one layer: query (B, C, h, w) float32, bank (N, C, h', w'),
        neighbours (B, K) int64 rows of the bank -> (B, h, w) float32, the mean distance of each
        query position to its ``k_features`` nearest among all positions of its K neighbours."""
        b, c, h, w = query.shape
        gallery_rows = neighbours.shape[1] * bank.shape[2] * bank.shape[3]
        if self.k_features > gallery_rows:
            raise ValueError(
                f"k_features={self.k_features} exceeds the {gallery_rows} gallery features of layer {layer!r} "
                f"({neighbours.shape[1]} images x {bank.shape[2]}x{bank.shape[3]} positions)"
            )
        # (N, h', w', C) view: selecting K images from it gives the (K*h'*w', C) gallery in one copy.
        bank_rows = bank.permute(0, 2, 3, 1)
        query_rows = query.to(bank.dtype).permute(0, 2, 3, 1).reshape(b, h * w, c)
        maps = []
        for i in range(b):  # each image has its own gallery
            gallery = bank_rows.index_select(0, neighbours[i]).reshape(gallery_rows, c)
            distances, _ = knn(query_rows[i], gallery, self.k_features)
            maps.append(distances.mean(dim=1).reshape(h, w))
        return torch.stack(maps)

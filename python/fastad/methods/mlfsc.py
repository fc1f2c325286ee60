"""MLF-SC: multi-layer features and sparse coding (Imamura et al., "MLF-SC: Incorporating
multi-layer features to sparse coding for anomaly detection", arXiv:2104.04289, 2021).

Feature maps of three levels of a pretrained CNN (VGG-16's ``conv2_2``, ``conv3_3`` and
``conv4_3`` before their ReLU: 128 + 256 + 512 = 896 channels) are each resized to 32 x 32 and
centre-cropped to 28 x 28. Every channel is then cut into 8 x 8 patches with stride 2 (121 a
channel, 64 values each), and every channel gets its own small dictionary (5 atoms), learned on
the training patches. A patch's anomaly score is its reconstruction error under Orthogonal
Matching Pursuit with 3 non-zeros; an image's score is the sum over channels of the mean of its
5 largest patch errors. For pixel metrics, each patch's error (summed over channels) is spread
back over the pixels it covers and averaged where patches overlap; the base class upsamples and
blurs that map.

Dictionary learning streams (``fastad.dictionary.DictionaryLearner.partial_fit``, one update per
chunk of images), and both learning and scoring code all 896 channels at once with
``fastad.ops.omp``; patches are formed a few images at a time so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from .._checks import check_int, check_state_tensor
from ..dictionary import DictionaryLearner
from .base import register_method
from .feature_model import FeatureModel

# Patches of at most this many values (all channels) are formed at once: 32 M floats, 128 MB.
_CHUNK_VALUES = 2**25
# How far from 1 an atom's norm may be: what fastad.ops.omp accepts.
_ATOM_NORM_TOLERANCE = 1e-3


@register_method("mlfsc")
class MLFSC(FeatureModel):
    """MLF-SC with the paper's defaults; every number is a named parameter.

    Parameters (besides :class:`FeatureModel`'s and :class:`AnomalyModel`'s, passed as ``**common``):

    * ``backbone``: ``"vgg16"`` (the paper); its layers default to the strides 2, 4, 8
      (``conv2_2``, ``conv3_3``, ``conv4_3``); other backbones take ``layers`` by name;
    * ``pre_relu``: VGG's convolution outputs before the ReLU (the paper); ignored by backbones
      whose layers are not followed by a separate ReLU;
    * ``feature_size`` / ``crop_size``: each level resized (bilinear) to this square, then
      centre-cropped (32 / 28);
    * ``patch_size`` / ``patch_stride``: the patches cut from each channel (8 / 2: 121 patches);
      ``crop_size - patch_size`` must be a multiple of ``patch_stride`` so that patches tile the crop;
    * ``n_atoms`` / ``n_nonzero``: atoms per channel's dictionary and OMP's non-zeros (5 / 3);
    * ``top_k``: the image score averages each channel's ``top_k`` largest patch errors (5);
    * ``dictionary_batch`` and ``seed``: the dictionary learner's mini-batch size and seed.

    Learned: ``dictionary_`` (C, n_atoms, patch_size**2) float32, one dictionary per channel.
    """

    default_strides: ClassVar[tuple[int, ...]] = (2, 4, 8)

    def __init__(
        self,
        *,
        backbone: str = "vgg16",
        pre_relu: bool = True,
        feature_size: int = 32,
        crop_size: int = 28,
        patch_size: int = 8,
        patch_stride: int = 2,
        n_atoms: int = 5,
        n_nonzero: int = 3,
        top_k: int = 5,
        dictionary_batch: int = 256,
        seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(backbone=backbone, **common)
        self.pre_relu = pre_relu
        self.feature_size = feature_size
        self.crop_size = crop_size
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.n_atoms = n_atoms
        self.n_nonzero = n_nonzero
        self.top_k = top_k
        self.dictionary_batch = dictionary_batch
        self.seed = seed

    def _backbone_options(self) -> dict[str, Any]:
        from ..features import BACKBONES

        return {"pre_relu": True} if self.pre_relu and BACKBONES[self.backbone].family == "vgg" else {}

    def _check_params(self) -> None:
        super()._check_params()
        for name in ("feature_size", "crop_size", "patch_size", "patch_stride", "n_atoms", "n_nonzero", "top_k", "dictionary_batch"):
            check_int(getattr(self, name), name)
        check_int(self.seed, "seed", minimum=0)
        if not self.patch_size <= self.crop_size <= self.feature_size:
            raise ValueError(f"need patch_size <= crop_size <= feature_size, got {self.patch_size}, {self.crop_size}, {self.feature_size}")
        if (self.crop_size - self.patch_size) % self.patch_stride:
            raise ValueError(f"crop_size - patch_size ({self.crop_size} - {self.patch_size}) must be a multiple of "
                             f"patch_stride ({self.patch_stride}) so that the patches cover the crop")
        if self.n_nonzero > min(self.n_atoms, self.patch_size**2):
            raise ValueError(f"n_nonzero ({self.n_nonzero}) must be at most n_atoms ({self.n_atoms}) and patch_size**2 ({self.patch_size**2})")

    def _check_state(self) -> None:
        super()._check_state()
        shape = (self.feature_channels(), self.n_atoms, self.patch_size**2)  # one dictionary per channel
        dictionary = check_state_tensor("dictionary_", getattr(self, "dictionary_", None), torch.float32, shape)
        # ops.omp codes over unit-norm atoms only (and refuses others, within this tolerance).
        low, high = (float(v) for v in torch.aminmax(torch.linalg.vector_norm(dictionary, dim=-1, dtype=torch.float64)))
        if not (abs(low - 1.0) <= _ATOM_NORM_TOLERANCE and abs(high - 1.0) <= _ATOM_NORM_TOLERANCE):
            raise ValueError(f"dictionary_ must hold atoms of unit norm (within {_ATOM_NORM_TOLERANCE}), "
                             f"got norms from {low:.6g} to {high:.6g}")

    # -- patches ---------------------------------------------------------------------------------

    def level_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, crop, crop) float32: every level resized to ``feature_size`` and centre-cropped,
        the levels' channels concatenated in network order."""
        size, crop = self.feature_size, self.crop_size
        top = (size - crop) // 2
        maps = [
            F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)[..., top : top + crop, top : top + crop]
            for f in self._features(images).values()
        ]
        return torch.cat(maps, dim=1)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """(C, B * P, patch_size**2) float32: each channel's P patches of each image (image-major),
        the layout ``fastad.ops.omp`` codes with one dictionary per channel."""
        maps = self.level_maps(images)
        b, c = maps.shape[:2]
        p, s = self.patch_size, self.patch_stride
        cut = maps.unfold(2, p, s).unfold(3, p, s)  # (B, C, n, n, p, p)
        return cut.reshape(b, c, -1, p * p).permute(1, 0, 2, 3).reshape(c, -1, p * p).contiguous()

    def _images_per_chunk(self, channels: int) -> int:
        n = (self.crop_size - self.patch_size) // self.patch_stride + 1
        return max(1, _CHUNK_VALUES // (channels * n * n * self.patch_size**2))

    def _chunks(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        yield from images.split(self._images_per_chunk(self.feature_channels()))

    # -- fit -------------------------------------------------------------------------------------

    def _fit_batches(self, batches: Iterator[torch.Tensor]) -> None:
        learner = None
        for images in batches:
            for chunk in self._chunks(images):
                x = self.patches(chunk)
                if learner is None:
                    learner = DictionaryLearner(x.shape[0], self.n_atoms, x.shape[2], self.n_nonzero,
                                                batch_size=self.dictionary_batch, seed=int(self.seed), device=self.device)
                learner.partial_fit(x)
        if learner is not None:
            self.dictionary_ = learner.dictionary_.float().contiguous()

    # -- score -----------------------------------------------------------------------------------

    def patch_errors(self, images: torch.Tensor) -> torch.Tensor:
        """(C, B, P) squared reconstruction errors of every patch of every channel."""
        parts = []
        for chunk in self._chunks(images):
            x = self.patches(chunk)
            if x.shape[0] != self.dictionary_.shape[0]:
                raise ValueError(f"the features have {x.shape[0]} channels but the model has {self.dictionary_.shape[0]} "
                                 "dictionaries; were the backbone or layers changed after fit?")
            indices, coefs = ops.omp(x, self.dictionary_, int(self.n_nonzero))
            errors = ops.omp_error(x, indices, coefs, self.dictionary_)
            parts.append(errors.reshape(x.shape[0], chunk.shape[0], -1))
        return torch.cat(parts, dim=1)

    def _score_batch(self, images: torch.Tensor):
        errors = self.patch_errors(images)  # (C, B, P)
        c, b, n_patches = errors.shape
        k = min(int(self.top_k), n_patches)
        image_scores = errors.topk(k, dim=-1).values.mean(-1).sum(0)
        # The map: each patch's error over all channels, spread over its pixels and averaged
        # where patches overlap, then the crop padded back (edge values) to the resized level's
        # extent so that it lines up with the image when the base class upsamples it.
        p, s, crop = self.patch_size, self.patch_stride, self.crop_size
        per_patch = errors.sum(0).unsqueeze(1).expand(b, p * p, n_patches)
        spread = F.fold(per_patch, output_size=(crop, crop), kernel_size=p, stride=s)
        cover = F.fold(torch.ones_like(per_patch), output_size=(crop, crop), kernel_size=p, stride=s)
        crop_map = spread / cover
        before = (self.feature_size - crop) // 2
        after = self.feature_size - crop - before
        patch_map = F.pad(crop_map, (before, after, before, after), mode="replicate") if before or after else crop_map
        return patch_map[:, 0], image_scores

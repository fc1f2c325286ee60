"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and
Localization", ICPR 2021 workshops).

Every position of the feature grid gets its own Gaussian: the embedding of a position is the
concatenation of three layers (strides 4, 8, 16: ``layer1..layer3`` of a ResNet), deeper layers
repeated over the first layer's grid, reduced to a seeded random subset of channels. Fitting
accumulates each position's mean and covariance over the training images in float64, streaming
(``fastad.gaussian_stats``): no embedding is kept, so memory does not grow with the number of
images. Scoring is the Mahalanobis distance of every position to its Gaussian, through
``fastad.ops.mahalanobis`` on the Cholesky factor of each precision matrix; the map is upsampled,
blurred (sigma 4) and its maximum is the image score.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .. import distributed, ops
from ..checks import check_int, check_state_tensor
from ..gaussian_stats import GaussianAccumulator
from ..precision import check_regularization, precision_factors
from .base import register_method
from .feature_model import FeatureModel

# The paper's channel subsets: 550 of Wide-ResNet-50's 1792, 100 of ResNet-18's 448. Other
# backbones keep every channel unless n_features says otherwise.
PAPER_FEATURES = {"wide_resnet50_2": 550, "resnet18": 100}


@register_method("padim")
class PaDiM(FeatureModel):
    """PaDiM with the paper's defaults (``backbone="wide_resnet50_2"``, 550 random channels).

    Parameters (besides :class:`FeatureModel`'s and :class:`AnomalyModel`'s, passed as ``**common``):

    * ``n_features``: how many channels of the concatenated embedding to keep, chosen at random
      with ``seed`` (None: the paper's 550 for Wide-ResNet-50, 100 for ResNet-18, every channel on
      other backbones). Clipped to the embedding's size.
    * ``covariance``: ``"empirical"`` (the paper: the unbiased sample covariance plus ``eps * I``)
      or ``"ledoit_wolf"`` (shrunk towards a scaled identity, plus ``eps * I`` if ``eps`` > 0).
    * ``eps``: the ridge added to every covariance (0.01 in the paper).
    * ``seed``: seeds the channel subset.
    * ``upsample_mode``: ``"bilinear"`` as the paper's code, ``"bicubic"`` or ``"nearest"``.

    Learned: ``channels_`` (D,) int64 indices into the concatenated embedding; ``mean_`` (P, D)
    float32 and ``precision_factor_`` (P, D, D) float32, the lower Cholesky factor of each
    position's precision, for the P = h * w positions of the training images' grid (``grid_``);
    all training and test images must have one size.
    """

    fits_across_processes = True  # see fastad.distributed

    default_strides: ClassVar[tuple[int, ...]] = (4, 8, 16)

    def __init__(
        self,
        *,
        n_features: int | None = None,
        covariance: str = "empirical",
        eps: float = 0.01,
        seed: int = 1024,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.n_features = n_features
        self.covariance = covariance
        self.eps = eps
        self.seed = seed

    def _check_params(self) -> None:
        super()._check_params()
        if self.n_features is not None:
            check_int(self.n_features, "n_features", meaning="or None: the paper's subset for the backbone")
        check_regularization(self.covariance, self.eps)
        check_int(self.seed, "seed", minimum=0)

    def _check_state(self) -> None:
        super()._check_state()
        total = self.feature_channels()
        # The subset's size is what fit drew, not n_features now (set_params after fit changes only
        # the parameter); the Gaussians must agree with it.
        channels = check_state_tensor("channels_", getattr(self, "channels_", None), torch.int64, ("D",))
        d = channels.numel()
        low, high = (int(v) for v in torch.aminmax(channels))
        if low < 0 or high >= total:
            raise ValueError(f"channels_ must index the {total} embedding channels, got values from {low} to {high}")
        if d > 1 and not bool((channels[1:] > channels[:-1]).all()):
            raise ValueError("channels_ must be increasing (a subset of the embedding's channels, in their order)")
        grid = getattr(self, "grid_", None)
        if not isinstance(grid, (list, tuple)) or len(grid) != 2:
            raise ValueError(f"grid_ must be the feature grid [h, w], got {grid!r}")
        for value in grid:
            check_int(value, "grid_")
        p = grid[0] * grid[1]
        check_state_tensor("mean_", getattr(self, "mean_", None), torch.float32, (p, d))
        factor = check_state_tensor(
            "precision_factor_", getattr(self, "precision_factor_", None), torch.float32, (p, d, d)
        )
        if not float(factor.diagonal(dim1=-2, dim2=-1).amin()) > 0:
            raise ValueError(
                "precision_factor_ must be Cholesky factors (a positive diagonal), got a diagonal entry <= 0"
            )

    # -- embedding -------------------------------------------------------------------------------

    def _channel_subset(self, total: int) -> torch.Tensor:
        """(D,) int64 sorted indices of the kept channels among ``total``, from ``seed``."""
        wanted = self.n_features if self.n_features is not None else PAPER_FEATURES.get(self.backbone, total)
        wanted = min(int(wanted), total)
        if wanted == total:
            return torch.arange(total)
        gen = torch.Generator().manual_seed(int(self.seed))
        return torch.randperm(total, generator=gen)[:wanted].sort().values

    def embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) float32 embeddings of a batch, on the model's device: the layers at the
        first layer's grid (deeper layers repeated by nearest-neighbour upsampling, as the paper's
        code does by unfolding), reduced to the kept channels before any upsampling."""
        features = self._features(images)
        layers = self.feature_layers()
        grid = tuple(features[layers[0]].shape[-2:])
        channels = self.__dict__.get("channels_")
        if channels is None:
            channels = self._channel_subset(self.feature_channels())
        channels = channels.to(features[layers[0]].device)
        first = features[layers[0]]
        b, (h, w) = first.shape[0], grid
        out = first.new_empty((b, h, w, channels.numel()))
        offset = column = 0
        for layer in layers:
            f = features[layer]
            mine = channels[(channels >= offset) & (channels < offset + f.shape[1])] - offset
            offset += f.shape[1]
            if mine.numel() == 0:
                continue
            f = f.index_select(1, mine).permute(0, 2, 3, 1)  # (B, h', w', c), a view
            target = out[..., column : column + mine.numel()]
            column += mine.numel()
            sh, sw = h // f.shape[1], w // f.shape[2]
            if (sh * f.shape[1], sw * f.shape[2]) == (h, w):
                # Nearest upsampling by whole factors is repetition: written straight into the
                # embedding through a (B, h', sh, w', sw, c) view, one pass per layer.
                target.view(b, f.shape[1], sh, f.shape[2], sw, -1).copy_(f[:, :, None, :, None, :])
            else:
                target.copy_(F.interpolate(f.permute(0, 3, 1, 2), size=grid, mode="nearest").permute(0, 2, 3, 1))
        return out

    # -- fit -------------------------------------------------------------------------------------

    def _fit_batches(self, batches: Iterator[torch.Tensor]) -> None:
        accumulator: GaussianAccumulator | None = None
        grid: tuple[int, int] | None = None
        for images in batches:
            if accumulator is None:
                self.channels_ = self._channel_subset(self.feature_channels())
            emb = self.embeddings(images)
            b, h, w, d = emb.shape
            if grid is None:
                grid = (h, w)
                accumulator = GaussianAccumulator(
                    h * w, d, device=self.device, fourth_moments=self.covariance == "ledoit_wolf"
                )
            elif (h, w) != grid:
                raise ValueError(
                    f"PaDiM fits one Gaussian per position and needs training images of one size; the feature grid was "
                    f"{grid[0]}x{grid[1]} and then {h}x{w} (resize the images, e.g. with the model's transform())"
                )
            accumulator.update(emb.reshape(b, h * w, d))
        if accumulator is None:
            return
        if distributed.is_distributed():
            accumulator.all_reduce_()  # every process's images, as one process would sum them
        self.grid_ = list(grid)
        self.mean_ = accumulator.mean().float()
        self.precision_factor_ = precision_factors(accumulator, covariance=self.covariance, eps=float(self.eps))

    def _moved_to(self, device: str) -> None:
        super()._moved_to(device)
        # A loaded or moved model holds row-major factors (model files store tensors contiguous);
        # the op reads another layout fastest on the CPU, so it is made once here, not per call.
        if isinstance(getattr(self, "precision_factor_", None), torch.Tensor):
            self.precision_factor_ = ops.mahalanobis_factor_layout(self.precision_factor_)

    # -- score -----------------------------------------------------------------------------------

    def _score_batch(self, images: torch.Tensor):
        emb = self.embeddings(images)
        b, h, w, d = emb.shape
        if [h, w] != list(self.grid_):
            raise ValueError(
                f"PaDiM was fitted on a {self.grid_[0]}x{self.grid_[1]} feature grid but these images give {h}x{w}; "
                "score images of the training size (the model's transform() resizes them)"
            )
        squared = ops.mahalanobis(emb.reshape(b, h * w, d), self.mean_, self.precision_factor_)
        return squared.clamp_min(0.0).sqrt().reshape(b, h, w), None

"""Gaussian AD (Rippel, Mertens & Merhof, "Modeling the Distribution of Normal Data in Pre-Trained
Deep Features for Anomaly Detection", ICPR 2020).

An image-level method: the output of every level of an EfficientNet (the stem, each of the seven
block groups and the final 1x1 head: nine levels) is globally average-pooled, and each level's
pooled features get one multivariate Gaussian, its covariance shrunk with Ledoit-Wolf. An image's
score is the sum over the levels of its Mahalanobis distances. Statistics are accumulated in
float64, streaming (``fastad.gaussian_stats``); scoring is ``fastad.ops.mahalanobis`` with one
shared precision (Q = 1). There is no anomaly map: the method does not localise, and
``predict(...).maps`` is None rather than an invented map.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .. import distributed, ops
from ..checks import check_fraction, check_state_tensor, keys_of
from ..features import BACKBONES
from ..gaussian_stats import GaussianAccumulator
from ..precision import check_regularization, precision_factors
from .base import register_method
from .feature_model import FeatureModel


@register_method("gaussian_ad")
class GaussianAD(FeatureModel):
    """Gaussian AD with the paper's defaults: EfficientNet-B4 at 380 x 380, all levels, Ledoit-Wolf.

    Parameters (besides :class:`FeatureModel`'s and :class:`AnomalyModel`'s, passed as ``**common``):

    * ``layers``: the levels (None: every layer of the backbone, i.e. the paper's nine levels of
      an EfficientNet; ``layer1..layer4`` on a ResNet, where the paper's code also pools the
      stem's max-pool output, which fastad does not expose as a layer);
    * ``covariance``: ``"ledoit_wolf"`` (the paper) or ``"empirical"`` (sample covariance plus
      ``eps * I``);
    * ``eps``: a ridge added to every covariance (0 by default: Ledoit-Wolf needs none).

    Learned: ``mean_`` ``{level: (1, C)}`` float32 and ``precision_factor_``
    ``{level: (1, C, C)}`` float32, the lower Cholesky factor of each level's precision;
    ``shrinkage_`` ``{level: float}`` (Ledoit-Wolf only).
    """

    fits_across_processes = True  # see fastad.distributed

    def __init__(
        self,
        *,
        backbone: str = "efficientnet_b4",
        resize: int | None = 380,
        crop: int | None = 380,
        covariance: str = "ledoit_wolf",
        eps: float = 0.0,
        **common: Any,
    ) -> None:
        super().__init__(backbone=backbone, resize=resize, crop=crop, **common)
        self.covariance = covariance
        self.eps = eps

    def feature_layers(self) -> list[str]:
        """The levels: the given layers, or every layer of the backbone, in network order."""
        if self.layers is None:
            if self.backbone not in BACKBONES:
                raise ValueError(f"unknown backbone {self.backbone!r}; known: {', '.join(BACKBONES)}")
            return list(BACKBONES[self.backbone].layer_info)
        return super().feature_layers()

    def _check_params(self) -> None:
        super()._check_params()
        check_regularization(self.covariance, self.eps)

    def _check_state(self) -> None:
        super()._check_state()
        info = BACKBONES[self.backbone].layer_info
        levels = self.feature_layers()
        for name in ("mean_", "precision_factor_"):
            value = getattr(self, name, None)
            if not isinstance(value, dict) or set(value) != set(levels):
                raise ValueError(f"{name} must be a dict of the levels {levels}, got {keys_of(value)}")
        for level in levels:
            c = info[level][0]
            check_state_tensor(f"mean_[{level!r}]", self.mean_[level], torch.float32, (1, c))
            factor = check_state_tensor(
                f"precision_factor_[{level!r}]", self.precision_factor_[level], torch.float32, (1, c, c)
            )
            if not float(factor.diagonal(dim1=-2, dim2=-1).amin()) > 0:
                raise ValueError(
                    f"precision_factor_[{level!r}] must be a Cholesky factor (a positive diagonal), "
                    "got a diagonal entry <= 0"
                )
        shrinkage = getattr(self, "shrinkage_", None)  # a record (Ledoit-Wolf only), not used in scoring
        if not isinstance(shrinkage, dict) or (shrinkage and set(shrinkage) != set(levels)):
            raise ValueError(f"shrinkage_ must be a dict of the levels {levels} or empty, got {keys_of(shrinkage)}")
        for level, value in shrinkage.items():
            check_fraction(value, f"shrinkage_[{level!r}]")

    def pooled_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{level: (B, C) float32}``: each level's feature map averaged over its positions."""
        return {layer: f.mean(dim=(2, 3)) for layer, f in self._features(images).items()}

    # -- fit -------------------------------------------------------------------------------------

    def _fit_batches(self, batches: Iterator[torch.Tensor]) -> None:
        accumulators: dict[str, GaussianAccumulator] = {}
        ledoit_wolf = self.covariance == "ledoit_wolf"
        for images in batches:
            for layer, pooled in self.pooled_features(images).items():
                if layer not in accumulators:
                    accumulators[layer] = GaussianAccumulator(
                        1, pooled.shape[1], device=self.device, fourth_moments=ledoit_wolf
                    )
                accumulators[layer].update(pooled.unsqueeze(1))
        if not accumulators:
            return
        if distributed.is_distributed():
            for acc in accumulators.values():  # the same levels in the same order on every process
                acc.all_reduce_()
        self.mean_, self.precision_factor_, self.shrinkage_ = {}, {}, {}
        for layer, acc in accumulators.items():
            self.mean_[layer] = acc.mean().float()
            try:
                self.precision_factor_[layer] = precision_factors(acc, covariance=self.covariance, eps=float(self.eps))
            except ValueError as error:
                raise ValueError(f"level {layer!r}: {error}") from None
            if ledoit_wolf:
                self.shrinkage_[layer] = float(acc.ledoit_wolf()[1][0])

    def _moved_to(self, device: str) -> None:
        super()._moved_to(device)
        # As PaDiM: a loaded or moved model holds row-major factors; the layout the op reads
        # fastest (and in which a fitted model holds them, so both score to the same bits) is
        # made once here.
        factors = getattr(self, "precision_factor_", None)
        if isinstance(factors, dict):
            self.precision_factor_ = {layer: ops.mahalanobis_factor_layout(f) for layer, f in factors.items()}

    # -- score -----------------------------------------------------------------------------------

    def _score_batch(self, images: torch.Tensor):
        total = None
        for layer, pooled in self.pooled_features(images).items():
            squared = ops.mahalanobis(pooled.unsqueeze(1), self.mean_[layer], self.precision_factor_[layer])
            distance = squared[:, 0].clamp_min(0.0).sqrt()
            total = distance if total is None else total + distance
        return None, total

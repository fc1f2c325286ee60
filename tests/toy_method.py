"""A method that exists only in the tests: per-position mean of 8x8-pooled colours.

It is deliberately simple (no backbone, no weights) so that the tests of the shared layer
exercise the base class, model files, the CLI and the report without any method's own logic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastad.checks import check_choice, check_int, check_state_tensor
from fastad.methods import AnomalyModel, register_method


@register_method("toy-mean")
class ToyMean(AnomalyModel):
    """Score of a position: distance of its pooled colour to the training mean there, divided by
    the training spread. Learned: ``mean_`` (3, h, w) tensor, ``spread_`` float."""

    def __init__(self, *, pool: int = 8, image_score: str = "map", **common) -> None:
        super().__init__(**common)
        self.pool = pool
        self.image_score = image_score

    def _check_params(self) -> None:
        super()._check_params()
        check_int(self.pool, "pool")
        check_choice(self.image_score, "image_score", ("map", "mean"))

    def _check_state(self) -> None:
        super()._check_state()
        check_state_tensor("mean_", getattr(self, "mean_", None), torch.float32, (3, "h", "w"))
        spread = getattr(self, "spread_", None)
        if isinstance(spread, bool) or not isinstance(spread, (int, float)) or not 0.0 < spread < math.inf:
            raise ValueError(f"spread_ must be a positive finite number, got {spread!r}")

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, self.pool)

    def _fit_batches(self, batches) -> None:
        total, count, sq = None, 0, None
        for images in batches:
            f = self._features(images).double()
            total = f.sum(0) if total is None else total + f.sum(0)
            sq = (f * f).sum(0) if sq is None else sq + (f * f).sum(0)
            count += f.shape[0]
        mean = total / count
        self.mean_ = mean.float()
        self.spread_ = float((sq / count - mean * mean).clamp_min(0).mean().sqrt()) + 1e-6

    def _score_batch(self, images: torch.Tensor):
        patch = (self._features(images) - self.mean_).norm(dim=1) / self.spread_
        if self.image_score == "mean":
            return patch, patch.mean(dim=(1, 2))
        return patch, None

"""The result of ``predict`` for every method."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Prediction:
    """What ``predict`` returns. ``scores`` (N,) float32, higher = more anomalous; ``maps``
    (N, H, W) float32 at the input resolution, or None for a method that scores whole images only
    (Gaussian AD); ``threshold`` the model's decision threshold (None when it has none)."""

    scores: torch.Tensor
    maps: torch.Tensor | None
    threshold: float | None = None

    @property
    def is_anomalous(self) -> torch.Tensor | None:
        return None if self.threshold is None else self.scores > self.threshold

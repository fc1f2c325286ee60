"""The in-place version of a tensor, for caches of values derived from it."""

from __future__ import annotations

import torch


def in_place_version(tensor: torch.Tensor) -> int | None:
    """``tensor._version`` (bumped by every in-place change), or None for an inference tensor,
    which has no version counter (it can only change inside ``torch.inference_mode``)."""
    try:
        return tensor._version
    except RuntimeError:
        return None

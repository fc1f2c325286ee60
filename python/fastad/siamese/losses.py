"""Training losses of the Siamese network, per position and averaged.

- Contrastive (Hadsell, Chopra and LeCun 2006) on the embeddings, d = ||f1 - f2||: ½ d² for a
  similar pair, ½ max(r - d, 0)² for a dissimilar one, margin r.
- Binary cross-entropy with logits on the discriminator's output, target 1 = similar.

``similar`` is a float tensor of 1 (similar) / 0 (dissimilar), one value per pair, broadcast over
the output grid (1 x 1 at the training size).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..checks import check_choice
from .network import SiameseOutput

__all__ = ["LOSSES", "contrastive_loss", "bce_loss", "siamese_loss"]

LOSSES = ("contrastive", "bce", "both")


def _per_position(similar: Tensor, like: Tensor) -> Tensor:
    """(B,) labels broadcast to ``like``'s (B, h, w)."""
    return similar.to(like.dtype).view(-1, *([1] * (like.dim() - 1))).expand_as(like)


def contrastive_loss(f1: Tensor, f2: Tensor, similar: Tensor, margin: float = 1.0) -> Tensor:
    """Mean contrastive loss; f1, f2 (B, D, h, w) embeddings, similar (B,) in {0, 1}."""
    squared = (f1 - f2).pow(2).sum(1)  # (B, h, w)
    # ½ d² is taken from the squared sum directly: sqrt's gradient at d = 0 is infinite.
    distance = squared.clamp_min(1e-12).sqrt()
    target = _per_position(similar, squared)
    pull = 0.5 * squared
    push = 0.5 * (margin - distance).clamp_min(0).pow(2)
    return (target * pull + (1 - target) * push).mean()


def bce_loss(logits: Tensor, similar: Tensor) -> Tensor:
    """Mean binary cross-entropy of similarity logits (B, h, w) against similar (B,)."""
    return F.binary_cross_entropy_with_logits(logits, _per_position(similar, logits))


def siamese_loss(out: SiameseOutput, similar: Tensor, kind: str = "bce", margin: float = 1.0) -> Tensor:
    """The training loss ``kind``: "contrastive", "bce" or "both" (their sum)."""
    check_choice(kind, "loss", LOSSES)
    if kind != "contrastive" and out.logits is None:
        raise ValueError(f"loss {kind!r} needs a discriminator; head 'none' trains with loss 'contrastive' only")
    total = out.f1.new_zeros(())
    if kind in ("contrastive", "both"):
        total = total + contrastive_loss(out.f1, out.f2, similar, margin)
    if kind in ("bce", "both"):
        total = total + bce_loss(out.logits, similar)
    return total

"""Training loop of the Siamese network: Adam over seeded pair batches, held-out loss per epoch.

A pair source is anything with ``len()``, ``set_epoch(e)`` and ``batch(indices)`` returning a
dict with float32 ``x1``, ``x2`` (B, C, H, W) in [0, 1] and ``similar`` (B,) — the pair sets of
:mod:`fastad.siamese.pairs` are. Training draws fresh pairs every epoch (``set_epoch``); the
held-out pairs are drawn once (epoch 0) so that their loss is comparable from epoch to epoch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from .._progress import progress_bar
from .checkpoint import TrainingState, resume, training_description, write_checkpoint
from .losses import siamese_loss
from .network import SiameseNet

__all__ = ["PairSource", "TrainingHistory", "train_network", "evaluate_pairs", "input_statistics"]


class PairSource(Protocol):
    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def batch(self, indices) -> dict: ...


@dataclass
class TrainingHistory:
    """Per-epoch mean losses (and held-out accuracy: the fraction of pairs whose predicted
    similarity, P(similar) > ½ or d < margin / 2 for head "none", matches the label)."""

    train_loss: list[float] = field(default_factory=list)
    heldout_loss: list[float] = field(default_factory=list)
    heldout_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainingHistory:
        return cls(
            [float(v) for v in d.get("train_loss", [])],
            [float(v) for v in d.get("heldout_loss", [])],
            [float(v) for v in d.get("heldout_accuracy", [])],
            float(d.get("seconds", 0.0)),
        )


def input_statistics(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of uint8 (N, C, H, W) or float [0, 1] images, in
    [0, 1] units, accumulated in float64 over chunks (no float copy of the whole set)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got {getattr(images, 'shape', images)!r}")
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64) / scale
        total += x.sum((0, 2, 3))
        total_sq += x.pow(2).sum((0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def _batches(n: int, batch_size: int, order: torch.Tensor | None = None):
    indices = torch.arange(n) if order is None else order
    for start in range(0, n, batch_size):
        yield indices[start : start + batch_size].tolist()


def evaluate_pairs(
    net: SiameseNet,
    pairs: PairSource,
    *,
    loss: str,
    margin: float,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """(mean loss, accuracy) of ``net`` on all of ``pairs`` (as drawn for epoch 0)."""
    was_training = net.training
    net.eval()
    pairs.set_epoch(0)
    total_loss, correct, count = 0.0, 0, 0
    with torch.inference_mode():
        for idx in _batches(len(pairs), batch_size):
            b = pairs.batch(idx)
            x1, x2 = b["x1"].to(device), b["x2"].to(device)
            similar = b["similar"].to(device)
            out = net(x1, x2)
            total_loss += float(siamese_loss(out, similar, loss, margin)) * len(idx)
            if out.logits is not None:
                predicted = out.logits.flatten(1).mean(1) > 0
            else:
                predicted = out.distance().flatten(1).mean(1) < margin / 2
            correct += int((predicted == (similar > 0.5)).sum())
            count += len(idx)
    net.train(was_training)
    return total_loss / max(count, 1), correct / max(count, 1)


def train_network(
    net: SiameseNet,
    train_pairs: PairSource,
    heldout_pairs: PairSource | None = None,
    *,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    loss: str = "bce",
    margin: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    log=None,
    checkpoint: str | os.PathLike | None = None,
) -> TrainingHistory:
    """Trains ``net`` in place with Adam and returns the per-epoch history.

    The batch order is drawn from ``seed`` (the pairs themselves from the pair source's own seed);
    the global torch RNG is not touched. ``log(epoch, history)`` is called after every epoch.

    ``checkpoint``: a file that the state of the training is written to after every epoch (see
    :mod:`fastad.siamese.checkpoint`). When it already holds a checkpoint of this training (same
    network, normalisation, pair sources and settings), training goes on from there: a training
    stopped after epoch k and started again gives the network and history of one that ran
    through, and with more ``epochs`` it extends a finished one. The history's ``seconds`` add
    up the time of every part. The file is left in place at the end.
    """
    for name, pairs in (("train_pairs", train_pairs), ("heldout_pairs", heldout_pairs)):
        if pairs is not None and not all(hasattr(pairs, a) for a in ("__len__", "set_epoch", "batch")):
            raise TypeError(
                f"{name} must be a pair source (len, set_epoch, batch: fastad.siamese.RectanglePairs or "
                f"DigitPairs), got {type(pairs).__name__}"
            )
    if len(train_pairs) == 0:
        raise ValueError("train_pairs is empty")
    net.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    order_gen = torch.Generator().manual_seed(seed)
    history = TrainingHistory()
    training = None
    if checkpoint is not None:
        training = training_description(
            net, train_pairs, heldout_pairs, loss=loss, margin=margin, lr=lr, batch_size=batch_size, seed=seed
        )
        saved_history = resume(checkpoint, training, net, optimizer, order_gen, epochs)
        if saved_history is not None:
            history = TrainingHistory.from_dict(saved_history)
    start = time.perf_counter() - history.seconds
    for epoch in range(len(history.train_loss), epochs):
        net.train()
        train_pairs.set_epoch(epoch)
        order = torch.randperm(len(train_pairs), generator=order_gen)
        running, seen = 0.0, 0
        with progress_bar(len(train_pairs), f"epoch {epoch + 1}/{epochs}", "pair", progress, leave=False) as bar:
            for idx in _batches(len(train_pairs), batch_size, order):
                b = train_pairs.batch(idx)
                out = net(b["x1"].to(device), b["x2"].to(device))
                value = siamese_loss(out, b["similar"].to(device), loss, margin)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                running += float(value.detach()) * len(idx)
                seen += len(idx)
                bar.update(len(idx))
        train_loss = running / seen
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training diverged in epoch {epoch + 1} (loss {train_loss}); lower lr={lr}")
        history.train_loss.append(train_loss)
        if heldout_pairs is not None and len(heldout_pairs):
            held_loss, held_acc = evaluate_pairs(net, heldout_pairs, loss=loss, margin=margin, device=device)
            history.heldout_loss.append(held_loss)
            history.heldout_accuracy.append(held_acc)
        history.seconds = time.perf_counter() - start
        if checkpoint is not None:
            write_checkpoint(
                checkpoint,
                training,
                TrainingState(
                    epoch + 1, net.state_dict(), optimizer.state_dict(), order_gen.get_state(), history.to_dict()
                ),
            )
        if log is not None:
            log(epoch, history)
    net.eval()
    return history

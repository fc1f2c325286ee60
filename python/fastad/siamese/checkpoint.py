"""Training checkpoints of the Siamese network, so that a long training survives being stopped.

A checkpoint holds everything :func:`fastad.siamese.train_network` needs to go on exactly where it
stopped: the network's parameters and buffers, Adam's state, the state of the generator that
draws the batch order, the history so far, and a description of the training it belongs to
(network, input normalisation, loss, learning rate, batch size, seed, the pair sources' kind,
size and seed). The pair sources draw each epoch's pairs from their seed and the epoch alone, so
a resumed training gives the numbers an uninterrupted one gives (on the same device and thread
count: oneDNN's rounding depends on them). It is written atomically after every epoch; a
checkpoint that belongs to another training, or is not one, is refused with the reason rather
than silently replaced.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path

__all__ = ["CheckpointError", "TrainingState", "training_description", "read_checkpoint", "write_checkpoint", "resume"]

_FORMAT = "fastad.siamese.training-checkpoint"
_VERSION = 1
_KEYS = ("format", "version", "training", "epochs_done", "network", "optimizer", "order_generator", "history")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and the reason."""


@dataclass
class TrainingState:
    """What a checkpoint restores: ``epochs_done`` epochs of training behind it."""

    epochs_done: int
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    order_generator: torch.Tensor
    history: dict[str, Any]


def _describe_pairs(pairs) -> dict[str, Any] | None:
    if pairs is None:
        return None
    described: dict[str, Any] = {"kind": type(pairs).__name__, "pairs": len(pairs)}
    for name in ("seed", "similar_fraction"):
        value = getattr(pairs, name, None)
        if isinstance(value, (int, float, str)) or value is None:
            described[name] = value
    return described


def training_description(net, train_pairs, heldout_pairs, **settings: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the network (its configuration and input
    normalisation), the pair sources (kind, size, seed) and ``settings`` (loss, lr ...), as plain
    JSON values."""
    described = {
        "network": net.config.to_dict(),
        "input_mean": [float(v) for v in net.input_mean.detach().cpu().reshape(-1)],
        "input_std": [float(v) for v in net.input_std.detach().cpu().reshape(-1)],
        "train_pairs": _describe_pairs(train_pairs),
        "heldout_pairs": _describe_pairs(heldout_pairs),
        **settings,
    }
    return json.loads(json.dumps(described))  # tuples become lists, as they come back from the file


def write_checkpoint(path: str | os.PathLike, training: dict[str, Any], state: TrainingState) -> Path:
    """Writes ``state`` of the training described by ``training`` to ``path`` atomically (a
    reader sees the previous checkpoint or this one, never a half-written file)."""
    path = Path(path)
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "training": json.dumps(training, sort_keys=True),
        "epochs_done": int(state.epochs_done),
        "network": {k: v.detach().cpu() for k, v in state.network.items()},
        "optimizer": state.optimizer,
        "order_generator": state.order_generator.cpu(),
        "history": state.history,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_checkpoint(path: str | os.PathLike, training: dict[str, Any]) -> TrainingState | None:
    """The state saved at ``path``, or None when there is no file there yet.

    Raises CheckpointError when the file is not a readable checkpoint of this format or was
    written for a different training than ``training`` (the differing items are named).
    """
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} exists and is not a file")
    try:
        # weights_only: plain containers and tensors only, nothing a tampered file could execute.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a readable training checkpoint ({type(exc).__name__}: {exc}); "
            "delete it to train from the start"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a fastad Siamese training checkpoint")
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    if payload["version"] != _VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload['version']!r}; this fastad reads {_VERSION}"
        )
    try:
        saved = json.loads(payload["training"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: its training description is not valid JSON ({exc})") from None
    if saved != training:
        differing = sorted(k for k in set(saved) | set(training) if saved.get(k) != training.get(k))
        shown = "; ".join(f"{k}: {saved.get(k)!r} in the file, {training.get(k)!r} now" for k in differing)
        raise CheckpointError(
            f"checkpoint {path} belongs to another training ({shown}); delete it or name another checkpoint file"
        )
    epochs_done, history, generator = payload["epochs_done"], payload["history"], payload["order_generator"]
    lists = ("train_loss", "heldout_loss", "heldout_accuracy")
    valid = (
        isinstance(epochs_done, int)
        and epochs_done >= 0
        and isinstance(payload["network"], dict)
        and all(isinstance(v, torch.Tensor) for v in payload["network"].values())
        and isinstance(payload["optimizer"], dict)
        and isinstance(generator, torch.Tensor)
        and generator.dtype == torch.uint8
        and isinstance(history, dict)
        and all(isinstance(history.get(k), list) for k in lists)
        and len(history["train_loss"]) == epochs_done
    )
    if not valid:
        raise CheckpointError(f"checkpoint {path} is damaged: its state does not hold together")
    return TrainingState(epochs_done, payload["network"], payload["optimizer"], generator, history)


def resume(path: str | os.PathLike, training: dict[str, Any], net, optimizer, order_generator, epochs: int):
    """Restores ``net``, ``optimizer`` and ``order_generator`` from the checkpoint at ``path`` and
    returns its history (a dict), or returns None when there is no checkpoint yet.

    Raises CheckpointError (see :func:`read_checkpoint`) also when the checkpoint holds more than
    ``epochs`` epochs or its state does not load; the network is then left as it came.
    """
    state = read_checkpoint(path, training)
    if state is None:
        return None
    if state.epochs_done > epochs:
        raise CheckpointError(
            f"checkpoint {path} holds {state.epochs_done} epochs, more than epochs={epochs}; "
            "a training cannot be shortened"
        )
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        net.load_state_dict(state.network, strict=True)
        optimizer.load_state_dict(state.optimizer)
        order_generator.set_state(state.order_generator)
    except (RuntimeError, ValueError, KeyError) as exc:
        net.load_state_dict(initial)  # load_state_dict copies what fits before it raises
        raise CheckpointError(f"checkpoint {path} does not fit this network: {exc}") from None
    return state.history

"""What the experiments share: the skip signal, seeded streams, cell scores, figure panels and
:class:`Run` (configuration, output folder, log, the CIFAR-10 images and detector)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastad import metrics
from fastad.checks import check_int
from fastad.siamese import load_image_folder

from .config import ReproduceConfig


class Skip(Exception):
    """An experiment cannot run here (its data is missing); the message says why."""


# ---------------------------------------------------------------------------------------------
# Shared helpers


def stream_generator(seed: int, stream: int) -> torch.Generator:
    """A torch generator for one purpose: seeds of different streams are unrelated draws of
    numpy's SeedSequence, not neighbouring integers."""
    state = np.random.SeedSequence([seed, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def cell_scores(amap: np.ndarray | Tensor, grid: int | tuple[int, int]) -> np.ndarray:
    """The maximum of an (H, W) map inside each cell of a ``grid`` (rows, cols) partition.

    H and W must be multiples of the grid's rows and columns; returns float64 (rows, cols).
    This is the score of a whole mosaic cell: one anomalous window in it is enough to flag it.
    """
    a = amap.detach().cpu().numpy() if isinstance(amap, Tensor) else np.asarray(amap)
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(f"grid must be an int or a (rows, cols) pair, got {grid!r}")
    rows, cols = grid
    check_int(rows, "grid rows")
    check_int(cols, "grid columns")
    if a.ndim != 2:
        raise ValueError(f"amap must be a 2-D (H, W) map, got shape {a.shape}")
    if a.shape[0] % rows or a.shape[1] % cols:
        raise ValueError(f"amap of shape {a.shape} does not split into a {rows} x {cols} grid of equal cells")
    h, w = a.shape[0] // rows, a.shape[1] // cols
    return a.reshape(rows, h, cols, w).max(axis=(1, 3)).astype(np.float64)


def pooled_pixel_auroc(masks: list[np.ndarray], maps: list[np.ndarray]) -> float:
    """Pixel AUROC over all pixels of several pairs, whatever their sizes."""
    flat_masks = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in masks])
    flat_maps = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in maps])
    return metrics.pixel_auroc(flat_masks[None, None], flat_maps[None, None])


def mean_of(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def rgb(image: Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, 3) float for imshow (grey repeated)."""
    a = np.asarray(image.detach().cpu() if isinstance(image, Tensor) else image, dtype=np.float32)
    if a.shape[0] == 1:
        a = np.repeat(a, 3, axis=0)
    return np.clip(a.transpose(1, 2, 0), 0.0, 1.0)


def panel_row(axes, panels: list[tuple[str, np.ndarray, dict]]) -> None:
    """Draws (title, picture, imshow options) panels on a row of axes, without ticks."""
    for ax, (title, picture, options) in zip(axes, panels, strict=False):
        image = ax.imshow(picture, interpolation="nearest", **options)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if options.get("cmap") == "jet":
            ax.figure.colorbar(image, ax=ax, fraction=0.035, pad=0.02)


def map_options(values: np.ndarray) -> dict:
    # Scores are 1 - P(similar) in [0, 1]; only head "none" gives unbounded distances.
    return {"cmap": "jet", "vmin": 0.0, "vmax": max(1.0, float(np.max(values)))}


def as_bool_array(x: Any) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)).astype(bool)


class Run:
    """What the experiments share: configuration, output folder, log and the CIFAR detector."""

    def __init__(self, out_dir: Path, config: ReproduceConfig, log: Callable[[str], Any]) -> None:
        self.out_dir, self.config, self.log = out_dir, config, log
        self.data_root = Path(config.data_root).expanduser().resolve()
        self.cifar_detector = None  # set by experiment 2
        self.cifar_skip_reason: str | None = None
        self._cifar: dict[str, Any] = {}  # split -> LabelledImages, each read once

    @property
    def cifar_zip(self) -> Path:
        return self.data_root / "cifar10.zip"

    def cifar_train(self):
        """CIFAR-10 training images (LabelledImages, ``cifar_limit`` of them), read once for
        experiments 2 and 3."""
        return self._cifar_split("train", self.config.cifar_limit)

    def cifar_test(self):
        """CIFAR-10 test images (LabelledImages), read once for experiments 2 and 3."""
        return self._cifar_split("test", self.config.cifar_test_limit)

    def _cifar_split(self, split: str, limit):
        if split not in self._cifar:
            if not self.cifar_zip.is_file():
                raise Skip(f"CIFAR-10 not found: {self.cifar_zip} is missing")
            self._cifar[split] = load_image_folder(
                self.cifar_zip, split, limit=limit, seed=self.config.seed, progress=self.config.progress
            )
        return self._cifar[split]

    def detector_kwargs(self) -> dict[str, Any]:
        c = self.config
        return dict(
            channels=tuple(c.channels), hidden=c.hidden, batch_size=c.batch_size, lr=c.lr, seed=c.seed, device=c.device
        )

    def checkpoint(self, what: str) -> Path:
        """The training checkpoint of ``what`` (``checkpoints/<what>.pt`` in the output folder):
        a run stopped during a long training and started again into the same folder goes on from
        its last finished epoch, with the numbers of an uninterrupted run."""
        path = self.out_dir / "checkpoints" / f"{what}.pt"
        path.parent.mkdir(exist_ok=True)
        if path.exists():
            self.log(f"[{what}] resuming from the training checkpoint {path}")
        return path

    def epoch_logger(self, what: str) -> Callable:
        def log(epoch: int, history) -> None:
            held = (
                ""
                if not history.heldout_loss
                else f", held-out loss {history.heldout_loss[-1]:.4f}, accuracy {history.heldout_accuracy[-1]:.3f}"
            )
            self.log(
                f"[{what}] epoch {epoch + 1}: train loss {history.train_loss[-1]:.4f}{held} ({history.seconds:.0f} s)"
            )

        return log


def net_device(net) -> torch.device:
    return next(net.parameters()).device

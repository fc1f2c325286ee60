"""Pictures: anomaly maps as colour heat maps and overlays on the image, PNG files, matplotlib
figures saved atomically, and the Siamese network's learning curve.

Images are float (3, H, W) in [0, 1]; maps float (H, W); pictures come out as uint8 (H, W, 3).
Heat maps of several images share one value range (``vmin``, ``vmax``) so that their colours
compare; without one, each map is scaled to its own range.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .io import atomic_path


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def image_to_rgb(image) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    a = _as_numpy(image)
    if a.ndim != 3 or a.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {a.shape}")
    return (np.clip(a.transpose(1, 2, 0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def heatmap(amap, *, vmin: float | None = None, vmax: float | None = None, cmap: str = "jet") -> np.ndarray:
    """Colours a map (H, W) with a matplotlib colour map: (H, W, 3) uint8."""
    from matplotlib import colormaps

    a = _as_numpy(amap).astype(np.float64)
    if a.ndim != 2:
        raise ValueError(f"map must have shape (H, W), got {a.shape}")
    lo = float(np.min(a)) if vmin is None else float(vmin)
    hi = float(np.max(a)) if vmax is None else float(vmax)
    scaled = np.clip((a - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(a)
    return (colormaps[cmap](scaled)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def overlay(
    image, amap, *, alpha: float = 0.5, vmin: float | None = None, vmax: float | None = None, cmap: str = "jet"
) -> np.ndarray:
    """The heat map of ``amap`` blended over ``image`` with weight ``alpha``: (H, W, 3) uint8."""
    rgb = image_to_rgb(image)
    heat = heatmap(amap, vmin=vmin, vmax=vmax, cmap=cmap)
    if rgb.shape != heat.shape:
        raise ValueError(f"image {rgb.shape[:2]} and map {heat.shape[:2]} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return ((1.0 - alpha) * rgb + alpha * heat + 0.5).astype(np.uint8)


def mask_to_rgb(mask) -> np.ndarray:
    """A boolean mask (H, W) as a white-on-black picture (H, W, 3) uint8."""
    m = _as_numpy(mask).astype(bool)
    return np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=2)


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png_bytes(rgb))
    return path


def save_map_png(path: str | Path, amap, *, vmin: float, vmax: float) -> Path:
    """The raw map as a 16-bit grayscale PNG, ``vmin`` -> 0 and ``vmax`` -> 65535 (the range goes
    in the caller's JSON so that values can be recovered)."""
    from PIL import Image

    a = _as_numpy(amap).astype(np.float64)
    scaled = np.clip((a - vmin) / (vmax - vmin), 0.0, 1.0) if vmax > vmin else np.zeros_like(a)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray((scaled * 65535.0 + 0.5).astype(np.uint16)).save(tmp, format="PNG")
    return path


def save_figure(fig, path: str | Path, dpi: int = 100) -> str:
    """A matplotlib figure as a PNG at ``path`` (atomically); returns the file name."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path.name


def learning_curve_figure(path: str | Path, history, title: str = "Siamese network training") -> str:
    """A Siamese training run's ``history`` (``fastad.siamese.TrainingHistory``): train and
    held-out loss per epoch (log scale when positive), held-out accuracy on a second axis, as a
    PNG at ``path`` under ``title``; returns the file name."""
    from matplotlib.figure import Figure  # a bare Figure: no pyplot, no global backend change
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    epochs = np.arange(1, len(history.train_loss) + 1)
    lines = ax.plot(epochs, history.train_loss, "o-", color="tab:blue", label="train loss")
    if history.heldout_loss:
        lines += ax.plot(
            epochs[: len(history.heldout_loss)], history.heldout_loss, "s-", color="tab:orange", label="held-out loss"
        )
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    if min(history.train_loss + history.heldout_loss, default=0.0) > 0:
        ax.set_yscale("log")  # the losses fall by orders of magnitude once the rule is learned
    if history.heldout_accuracy:
        acc = ax.twinx()
        lines += acc.plot(
            epochs[: len(history.heldout_accuracy)],
            history.heldout_accuracy,
            "^--",
            color="tab:green",
            label="held-out accuracy",
        )
        acc.set_ylabel("held-out pair accuracy")
        acc.set_ylim(0.0, 1.0)
    ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)

"""The Siamese network's four experiments as one call: figures (PNG) and ``results.json``.

1. ``mnist_clustering``: three networks with a 3-D embedding on MNIST digit pairs (same digit =
   similar; 50,000 random pairs an epoch, about 10 % similar, 100 epochs, as the paper): (a) no
   discriminator, contrastive loss; (b) "concat" discriminator, BCE; (c)
   "distance" discriminator, BCE. Figures: the embeddings of training digits in 3-D and the
   similarity matrices of unseen digits. Numbers: held-out pair accuracy, mean similarity of
   same-digit and different-digit test pairs, pair AUROC.
2. ``cifar_learning_curve``: the detector trained on CIFAR-10 pairs with synthetic rectangles,
   held-out loss and accuracy on test-set pairs per epoch (or a given model's recorded history).
3. ``mosaic``: 100 CIFAR-10 training images (as the paper; ``mosaic_images="test"``: unseen ones)
   on a 10 x 10 grid as template, rectangles in half of the cells as inspected; cell-level and
   pixel-level AUROC over several mosaics.
4. ``aerial``: a 1260 x 720 template built from the change-detection "before" images, 100 small
   rectangles scattered over it (pixel AUROC, throughput in megapixels per second), then the
   real before / after pairs of LEVIR-CD and DSIFN-CD against their change masks.

Each experiment that lacks its data is recorded as skipped with the reason (in ``results.json``
and the log) while the others run. Every random draw comes from a seeded ``torch.Generator`` or
a pair source's own seed, so a rerun with the same configuration gives the same numbers.
Figures are drawn on bare matplotlib ``Figure`` objects (no pyplot, no global backend change)
and every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import metrics
from .._checks import check_choice, check_device, check_int, check_positive_float
from .._version import __version__
from ..io import atomic_path, write_json
from .network import NetworkConfig

__all__ = ["EXPERIMENTS", "ReproduceConfig", "aligned_cell_scores", "cell_scores", "reproduce"]

EXPERIMENTS = ("mnist_clustering", "cifar_learning_curve", "mosaic", "aerial")

MOSAIC_GRID = 10  # cells a side; each cell one 32 x 32 CIFAR-10 image
AERIAL_HEIGHT, AERIAL_WIDTH = 720, 1260
AERIAL_RECTANGLES, AERIAL_RECTANGLE_SIZE = 100, (5, 15)
CHANGE_SETS = ("LEVIR", "DSIFN")
MNIST_VARIANTS = (  # (name, head, loss): the three ways of learning "same digit"
    ("none_contrastive", "none", "contrastive"),
    ("concat_bce", "concat", "bce"),
    ("distance_bce", "distance", "bce"),
)
TRANSFER_NOTE = (
    "The detector used here was trained only on pairs of CIFAR-10 images with synthetic filled blue "
    "rectangles (a pair is dissimilar when exactly one of its images has one). It never saw an "
    "aerial photograph nor a real change, so the LEVIR-CD and DSIFN-CD numbers measure how far that "
    "synthetic training transfers; they are not the results of a change detector trained on those sets."
)

# Independent random streams, one per purpose (see _generator).
_STREAM_MNIST_PICKS, _STREAM_MOSAIC, _STREAM_AERIAL = 1, 2, 3


@dataclass
class ReproduceConfig:
    """Every setting of :func:`reproduce`; the defaults are the full reproduction.

    data_root: folder with ``mnist/``, ``cifar10.zip`` and ``change_detection/`` (see
        /work/shared/data/README.md); a relative path is taken from the current directory.
    cifar_model: a trained CIFAR-10 detector file to use instead of training one (experiment 2
        then plots that model's recorded history); None trains.
    cifar_epochs, cifar_pairs (pairs per epoch; None = one per training image), cifar_limit
        (training images; None = all 50,000), cifar_test_limit (test images read; None = all
        10,000), cifar_heldout_pairs (held-out pairs drawn from the test images).
    mnist_epochs (100, the paper's), mnist_pairs (pairs per epoch, 50,000), mnist_similar_fraction
        (None: random pairs, about 10 % of the same digit, as the paper drew them; 0.5: balanced),
        mnist_limit / mnist_test_limit (images read; None = all), mnist_heldout_pairs (balanced, so
        that accuracy weighs "same" and "different" alike), mnist_scatter (training digits in the
        3-D plots), similarity_per_digit (test digits per class in the similarity matrices).
    mosaics: independent 10 x 10 mosaics behind the numbers (the figure shows the first);
        mosaic_images: "train" (the paper: 100 CIFAR-10 training images) or "test" (unseen ones).
    change_pairs_shown: before / after pairs per set in ``change_detection.png``.
    channels, embed_dim, hidden, batch_size, lr: the networks' widths and training (MNIST uses
        ``channels``, ``hidden``, ``batch_size`` and ``lr`` too, with its 3-D embedding).
    seed: every random draw derives from it. device: "cpu", "cuda" ... progress: progress
        bars (None: only on a terminal).
    """

    data_root: Path = Path("../shared/data")
    cifar_model: Path | None = None
    cifar_epochs: int = 20
    cifar_pairs: int | None = None
    cifar_limit: int | None = None
    cifar_test_limit: int | None = None
    cifar_heldout_pairs: int = 10_000
    mnist_epochs: int = 100
    mnist_pairs: int = 50_000
    mnist_similar_fraction: float | None = None
    mnist_limit: int | None = None
    mnist_test_limit: int | None = None
    mnist_heldout_pairs: int = 10_000
    mnist_scatter: int = 3_000
    similarity_per_digit: int = 2
    mosaics: int = 10
    mosaic_images: str = "train"
    change_pairs_shown: int = 2
    channels: tuple[int, int, int, int, int] = (16, 32, 64, 64, 128)
    embed_dim: int = 64
    hidden: int = 64
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    progress: bool | None = None

    @classmethod
    def quick(cls, **changes: Any) -> ReproduceConfig:
        """A tiny setting that runs every step in well under a minute on two CPU cores (a few
        hundred images and pairs, one epoch, one mosaic, narrow networks): it checks the
        pipeline, not the paper's numbers. ``changes`` override any field."""
        settings: dict[str, Any] = dict(
            cifar_epochs=1,
            cifar_pairs=256,
            cifar_limit=256,
            cifar_test_limit=200,
            cifar_heldout_pairs=128,
            mnist_epochs=1,
            mnist_pairs=256,
            mnist_limit=300,
            mnist_test_limit=200,
            mnist_heldout_pairs=128,
            mnist_scatter=300,
            mosaics=1,
            change_pairs_shown=1,
            channels=(4, 8, 8, 8, 16),
            embed_dim=8,
            hidden=8,
            batch_size=64,
            lr=3e-3,
        )
        settings.update(changes)
        return cls(**settings)

    def check(self) -> None:
        """ValueError / TypeError / FileNotFoundError naming the first bad field."""
        for name in (
            "cifar_epochs",
            "cifar_heldout_pairs",
            "mnist_epochs",
            "mnist_pairs",
            "mnist_heldout_pairs",
            "mnist_scatter",
            "similarity_per_digit",
            "mosaics",
            "embed_dim",
            "hidden",
            "batch_size",
        ):
            check_int(getattr(self, name), name)
        check_int(self.seed, "seed", minimum=0)
        check_int(self.change_pairs_shown, "change_pairs_shown", minimum=0)
        for name in ("cifar_pairs", "cifar_limit", "cifar_test_limit", "mnist_limit", "mnist_test_limit"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, meaning="or None for all")
        check_positive_float(self.lr, "lr")
        check_choice(self.mosaic_images, "mosaic_images", ("train", "test"))
        if self.mnist_similar_fraction is not None and not (
            isinstance(self.mnist_similar_fraction, (int, float)) and 0.0 <= self.mnist_similar_fraction <= 1.0
        ):
            raise ValueError(
                f"mnist_similar_fraction must be None (random pairs) or in [0, 1], got {self.mnist_similar_fraction!r}"
            )
        if not isinstance(self.data_root, (str, os.PathLike)):
            raise TypeError(f"data_root must be a path, got {type(self.data_root).__name__}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise TypeError(f"progress must be True, False or None, got {self.progress!r}")
        if self.cifar_model is not None and not Path(self.cifar_model).is_file():
            raise FileNotFoundError(f"cifar_model: no such model file: {self.cifar_model}")
        check_device(self.device)
        # The widths now, rather than when the first network is built after minutes of loading.
        try:
            NetworkConfig(channels=tuple(self.channels), embed_dim=self.embed_dim, hidden=self.hidden)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"channels / embed_dim / hidden: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (paths as strings, tuples as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


class _Skip(Exception):
    """An experiment cannot run here (its data is missing); the message says why."""


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _generator(seed: int, stream: int) -> torch.Generator:
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


def _pooled_pixel_auroc(masks: list[np.ndarray], maps: list[np.ndarray]) -> float:
    """Pixel AUROC over all pixels of several pairs, whatever their sizes."""
    flat_masks = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in masks])
    flat_maps = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in maps])
    return metrics.pixel_auroc(flat_masks[None, None], flat_maps[None, None])


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _save_figure(fig, path: Path, dpi: int = 100) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path.name


def _rgb(image: Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, 3) float for imshow (grey repeated)."""
    a = np.asarray(image.detach().cpu() if isinstance(image, Tensor) else image, dtype=np.float32)
    if a.shape[0] == 1:
        a = np.repeat(a, 3, axis=0)
    return np.clip(a.transpose(1, 2, 0), 0.0, 1.0)


def _panel_row(axes, panels: list[tuple[str, np.ndarray, dict]]) -> None:
    """Draws (title, picture, imshow options) panels on a row of axes, without ticks."""
    for ax, (title, picture, options) in zip(axes, panels, strict=False):
        image = ax.imshow(picture, interpolation="nearest", **options)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if options.get("cmap") == "jet":
            ax.figure.colorbar(image, ax=ax, fraction=0.035, pad=0.02)


def _map_options(values: np.ndarray) -> dict:
    # Scores are 1 - P(similar) in [0, 1]; only head "none" gives unbounded distances.
    return {"cmap": "jet", "vmin": 0.0, "vmax": max(1.0, float(np.max(values)))}


def _as_bool_array(x: Any) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)).astype(bool)


class _Run:
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
            from .sources import load_image_folder

            if not self.cifar_zip.is_file():
                raise _Skip(f"CIFAR-10 not found: {self.cifar_zip} is missing")
            self._cifar[split] = load_image_folder(
                self.cifar_zip, split, limit=limit, seed=self.config.seed, progress=self.config.progress
            )
        return self._cifar[split]

    def detector_kwargs(self) -> dict[str, Any]:
        c = self.config
        return dict(
            channels=tuple(c.channels), hidden=c.hidden, batch_size=c.batch_size, lr=c.lr, seed=c.seed, device=c.device
        )

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


# ---------------------------------------------------------------------------------------------
# The driver


def reproduce(
    out_dir: str | os.PathLike, config: ReproduceConfig | None = None, *, log: Callable[[str], Any] = print
) -> dict[str, Any]:
    """Runs the four experiments (module docstring) and writes their figures and
    ``out_dir/results.json`` (rewritten after each experiment, so a long run that stops keeps
    what it finished). Returns the results: one entry per name of :data:`EXPERIMENTS`, each
    with ``status`` ("done" or "skipped"), ``reason`` when skipped, ``seconds``, ``figures`` and
    its numbers; plus ``config``, ``fastad_version``, ``torch_version``, ``seconds``."""
    config = ReproduceConfig() if config is None else config
    if not isinstance(config, ReproduceConfig):
        raise TypeError(f"config must be a ReproduceConfig or None, got {type(config).__name__}")
    config.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(out_dir, config, log)
    results: dict[str, Any] = {
        "config": {**config.to_dict(), "data_root": str(run.data_root)},
        "fastad_version": __version__,
        "torch_version": torch.__version__,
        "finished": False,
    }
    steps = {
        "mnist_clustering": _mnist_clustering,
        "cifar_learning_curve": _cifar_learning_curve,
        "mosaic": _mosaic,
        "aerial": _aerial,
    }
    start = time.perf_counter()
    for name in EXPERIMENTS:
        log(f"[{name}] starting")
        began = time.perf_counter()
        try:
            entry = {"status": "done", **steps[name](run)}
        except _Skip as skip:
            entry = {"status": "skipped", "reason": str(skip)}
            log(f"[{name}] skipped: {skip}")
            if name == "cifar_learning_curve":
                run.cifar_skip_reason = str(skip)
        entry["seconds"] = time.perf_counter() - began
        results[name] = entry
        if entry["status"] == "done":
            log(f"[{name}] done in {entry['seconds']:.1f} s")
        write_json(out_dir / "results.json", results)
    results["seconds"] = time.perf_counter() - start
    results["finished"] = True
    write_json(out_dir / "results.json", results)
    return results


# ---------------------------------------------------------------------------------------------
# 1. MNIST: what the three heads learn


def _mnist_clustering(run: _Run) -> dict[str, Any]:
    c = run.config
    root = run.data_root / "mnist"
    if not root.is_dir():
        raise _Skip(f"MNIST not found: {root} is missing")
    from .detector import SiameseDetector
    from .pairs import DigitPairs
    from .sources import load_mnist

    try:
        train = load_mnist(root, "train", limit=c.mnist_limit, seed=c.seed)
        test = load_mnist(root, "test", limit=c.mnist_test_limit, seed=c.seed)
    except FileNotFoundError as exc:
        raise _Skip(f"MNIST incomplete: {exc}") from None
    train_pairs = DigitPairs(
        train.images, train.labels, c.mnist_pairs, seed=c.seed, similar_fraction=c.mnist_similar_fraction
    )
    heldout = DigitPairs(test.images, test.labels, c.mnist_heldout_pairs, seed=c.seed + 1, similar_fraction=0.5)
    run.log(
        f"[mnist_clustering] {len(train)} training digits, {len(train_pairs)} pairs per epoch, "
        f"{len(heldout)} held-out pairs from {len(test)} test digits"
    )

    generator = _generator(c.seed, _STREAM_MNIST_PICKS)
    scatter_index = torch.randperm(len(train), generator=generator)[: c.mnist_scatter]
    matrix_index = _per_class_picks(test.labels, c.similarity_per_digit, generator)

    variants: dict[str, Any] = {}
    embeddings, matrices = {}, {}
    for name, head, loss in MNIST_VARIANTS:
        detector = SiameseDetector(
            window=28, in_channels=1, embed_dim=3, head=head, loss=loss, epochs=c.mnist_epochs, **run.detector_kwargs()
        )
        detector.train(
            train_pairs,
            heldout,
            normalization_images=train.images,
            progress=c.progress,
            log=run.epoch_logger(f"mnist_clustering {name}"),
        )
        net, history = detector.network_, detector.history_
        embeddings[name] = _embed_digits(net, train.images[scatter_index])
        matrices[name] = _similarity_matrix(net, test.images[matrix_index], detector.margin)
        same, different, pair_auroc = _pair_similarities(net, heldout, detector.margin, c.batch_size)
        variants[name] = {
            "head": head,
            "loss": loss,
            "heldout_accuracy": history.heldout_accuracy[-1],
            "heldout_loss": history.heldout_loss[-1],
            "train_loss": history.train_loss,
            "training_seconds": history.seconds,
            "mean_similarity_same_digit": same,
            "mean_similarity_different_digit": different,
            "pair_auroc": pair_auroc,
        }
    figures = [
        _embedding_figure(run.out_dir / "mnist_embeddings.png", embeddings, train.labels[scatter_index].numpy()),
        _similarity_figure(run.out_dir / "mnist_similarity.png", matrices, test.labels[matrix_index].numpy()),
    ]
    return {
        **{f"{name}_heldout_accuracy": v["heldout_accuracy"] for name, v in variants.items()},
        "variants": variants,
        "n_train_images": len(train),
        "n_test_images": len(test),
        "pairs_per_epoch": len(train_pairs),
        "heldout_pairs": len(heldout),
        "epochs": c.mnist_epochs,
        "definitions": {
            "similarity": (
                "P(similar) = sigmoid(logit) for the heads with a discriminator; exp(-d^2 / margin^2) "
                "of the embedding distance d for head 'none' (margin = the contrastive margin, 1)"
            ),
            "heldout_accuracy": (
                "a pair is called similar when P(similar) > 1/2, or for head 'none' when "
                "d < margin / 2 (fastad.siamese.training.evaluate_pairs)"
            ),
            "pair_auroc": "AUROC of 1 - similarity separating different-digit from same-digit held-out pairs",
        },
        "figures": figures,
    }


def _per_class_picks(labels: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    """Indices of ``per_class`` random items of every class present, sorted by class."""
    order = torch.randperm(labels.shape[0], generator=generator)
    picks = []
    for label in torch.unique(labels).tolist():
        picks.append(order[labels[order] == label][:per_class])
    return torch.cat(picks)


def _net_device(net) -> torch.device:
    return next(net.parameters()).device


def _embed_digits(net, images: Tensor, batch: int = 1024) -> np.ndarray:
    """uint8 (N, 1, 28, 28) -> float (N, D) embeddings (the 1 x 1 output grid flattened)."""
    out = []
    with torch.inference_mode():
        for chunk in images.split(batch):
            out.append(net.embed(chunk.to(_net_device(net), torch.float32) / 255).flatten(1).cpu())
    return torch.cat(out).numpy()


def _similarity_from(net, f1: Tensor, f2: Tensor, margin: float) -> Tensor:
    """Per-pair similarity in [0, 1], averaged over the output grid: P(similar) from the
    discriminator, or exp(-d^2 / margin^2) of the embedding distance for head "none"."""
    logits = net.similarity_logits(f1, f2)
    if logits is None:
        similarity = torch.exp(-(f1 - f2).pow(2).sum(1) / margin**2)
    else:
        similarity = torch.sigmoid(logits)
    return similarity.flatten(1).mean(1)


def _similarity_matrix(net, images: Tensor, margin: float) -> np.ndarray:
    """(n, n) similarity of every ordered pair of uint8 (n, 1, 28, 28) digits."""
    with torch.inference_mode():
        f = net.embed(images.to(_net_device(net), torch.float32) / 255)
        n = f.shape[0]
        s = _similarity_from(net, f.repeat_interleave(n, 0), f.repeat(n, 1, 1, 1), margin)
    return s.reshape(n, n).cpu().numpy()


def _pair_similarities(net, pairs, margin: float, batch: int) -> tuple[float | None, float | None, float | None]:
    """(mean similarity of similar pairs, of dissimilar pairs, AUROC of 1 - similarity for
    dissimilar vs similar) over all held-out pairs (as drawn for epoch 0)."""
    pairs.set_epoch(0)
    scores, labels = [], []
    device = _net_device(net)
    with torch.inference_mode():
        for start in range(0, len(pairs), batch):
            b = pairs.batch(list(range(start, min(start + batch, len(pairs)))))
            out = net(b["x1"].to(device), b["x2"].to(device))
            scores.append(_similarity_from(net, out.f1, out.f2, margin).cpu())
            labels.append(b["similar"].cpu() > 0.5)
    s, similar = torch.cat(scores).double().numpy(), torch.cat(labels).numpy()
    same = float(s[similar].mean()) if similar.any() else None
    different = float(s[~similar].mean()) if (~similar).any() else None
    auroc = metrics.image_auroc(~similar, 1.0 - s) if similar.any() and (~similar).any() else None
    return same, different, auroc


def _embedding_figure(path: Path, embeddings: dict[str, np.ndarray], labels: np.ndarray) -> str:
    import mpl_toolkits.mplot3d  # noqa: F401  (registers the "3d" projection)
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    colours = colormaps["tab10"]
    fig = Figure(figsize=(6 * len(embeddings), 6), layout="constrained")
    for k, (name, points) in enumerate(embeddings.items()):
        ax = fig.add_subplot(1, len(embeddings), k + 1, projection="3d")
        for digit in np.unique(labels):
            sel = labels == digit
            ax.scatter(
                points[sel, 0],
                points[sel, 1],
                points[sel, 2],
                s=4,
                color=colours(int(digit) % 10),
                label=str(int(digit)),
                depthshade=False,
            )
        ax.set_title(f"{name}: 3-D embeddings of {len(labels)} training digits", fontsize=9)
        ax.legend(title="digit", fontsize=7, markerscale=3, loc="upper left")
    return _save_figure(fig, path)


def _similarity_figure(path: Path, matrices: dict[str, np.ndarray], labels: np.ndarray) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(matrices), 5), layout="constrained")
    ticks = np.arange(len(labels))
    for k, (name, matrix) in enumerate(matrices.items()):
        ax = fig.add_subplot(1, len(matrices), k + 1)
        image = ax.imshow(matrix, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks(ticks, [str(int(d)) for d in labels], fontsize=6)
        ax.set_yticks(ticks, [str(int(d)) for d in labels], fontsize=6)
        rule = "exp(-d²/margin²)" if name.startswith("none") else "P(similar)"
        ax.set_title(f"{name}: {rule} of unseen digits (white = similar)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# 2. CIFAR-10: training the detector


def _cifar_learning_curve(run: _Run) -> dict[str, Any]:
    from .detector import SiameseDetector

    c = run.config
    if c.cifar_model is not None:
        detector = SiameseDetector.load(c.cifar_model, device=c.device)
        run.cifar_detector = detector
        history = detector.history_
        info = {
            "source": "loaded",
            "model": str(Path(c.cifar_model).resolve()),
            "model_training": detector.training_info_,
            "model_params": detector.get_params(),
        }
        run.log(f"[cifar_learning_curve] using the trained model {c.cifar_model}")
    else:
        detector, info = _train_cifar(run)
        history = detector.history_
    figure = learning_curve_figure(run.out_dir / "cifar_learning_curve.png", history)
    return {
        "final_train_loss": history.train_loss[-1] if history.train_loss else None,
        "final_heldout_loss": history.heldout_loss[-1] if history.heldout_loss else None,
        "final_heldout_accuracy": history.heldout_accuracy[-1] if history.heldout_accuracy else None,
        "epochs": len(history.train_loss),
        **history.to_dict(),
        **info,
        "figures": [figure],
    }


def _train_cifar(run: _Run):
    c = run.config
    if not run.cifar_zip.is_file():
        raise _Skip(f"CIFAR-10 not found: {run.cifar_zip} is missing (or pass cifar_model to reuse a trained detector)")
    from .detector import SiameseDetector
    from .pairs import RectanglePairs

    train = run.cifar_train()
    test = run.cifar_test()
    train_pairs = RectanglePairs(train.images, c.cifar_pairs, seed=c.seed)
    heldout = RectanglePairs(test.images, min(c.cifar_heldout_pairs, len(test)), seed=c.seed + 1)
    run.log(
        f"[cifar_learning_curve] {len(train)} training images, {len(train_pairs)} pairs per epoch, "
        f"{len(heldout)} held-out pairs from {len(test)} test images, {c.cifar_epochs} epochs on {c.device}"
    )
    detector = SiameseDetector(embed_dim=c.embed_dim, epochs=c.cifar_epochs, **run.detector_kwargs())
    training_info = {
        "command": "fastad.siamese.reproduce",
        "data": str(run.cifar_zip),
        "pairs": "rectangles",
        "n_images": len(train),
        "pairs_per_epoch": len(train_pairs),
        "heldout_pairs": len(heldout),
    }
    detector.train(
        train_pairs,
        heldout,
        normalization_images=train.images,
        progress=c.progress,
        log=run.epoch_logger("cifar_learning_curve"),
        training_info=training_info,
    )
    model = detector.save(run.out_dir / "siamese_cifar10.safetensors")
    run.cifar_detector = detector
    return detector, {
        "source": "trained",
        "model": model.name,
        "n_train_images": len(train),
        "pairs_per_epoch": len(train_pairs),
        "heldout_pairs": len(heldout),
    }


def learning_curve_figure(path: Path, history) -> str:
    """Train and held-out loss per epoch (log scale when positive), held-out accuracy on a
    second axis, as a PNG at ``path``; returns the file name."""
    from matplotlib.figure import Figure
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
    ax.set_title("Siamese network on CIFAR-10 pairs with synthetic rectangles", fontsize=10)
    return _save_figure(fig, path)


def _require_detector(run: _Run, what: str):
    if run.cifar_detector is None:
        reason = run.cifar_skip_reason or "experiment 2 did not run"
        raise _Skip(f"{what} needs the CIFAR-10 detector of experiment 2, which was not made ({reason})")
    return run.cifar_detector


# ---------------------------------------------------------------------------------------------
# 3. Mosaic of unseen CIFAR-10 test images


def _mosaic(run: _Run) -> dict[str, Any]:
    c = run.config
    # The paper builds its mosaic from CIFAR-10 training images (mosaic_images="test": unseen ones).
    # Reading them skips first when CIFAR-10 is missing: the data reason is the clearer one.
    test = run.cifar_train() if c.mosaic_images == "train" else run.cifar_test()
    detector = _require_detector(run, "the mosaic experiment")
    from .pairs import mosaic_pair

    cells = MOSAIC_GRID * MOSAIC_GRID
    if len(test) < cells:
        raise _Skip(
            f"a {MOSAIC_GRID}x{MOSAIC_GRID} mosaic needs {cells} {c.mosaic_images} images, only {len(test)} were read"
        )
    generator = _generator(c.seed, _STREAM_MOSAIC)
    aurocs: dict[str, list[float]] = {"cell": [], "aligned_cell": [], "pixel": []}
    figure = None
    for m in range(c.mosaics):
        pick = torch.randperm(len(test), generator=generator)[:cells]
        pair = mosaic_pair(test.images[pick], generator, grid=MOSAIC_GRID, defect_fraction=0.5)
        template, inspected = pair["template"], pair["inspected"]
        mask, labels = _as_bool_array(pair["mask"]), _as_bool_array(pair["cell_labels"])
        detection = detector.detect(template, inspected)
        full = detection.full_resolution()
        aurocs["cell"].append(metrics.image_auroc(labels.ravel(), cell_scores(full, labels.shape).ravel()))
        if detector.network_.window * MOSAIC_GRID == template.shape[-1]:  # a model of another window has none
            aligned = aligned_cell_scores(detector.network_, template, inspected, MOSAIC_GRID)
            aurocs["aligned_cell"].append(metrics.image_auroc(labels.ravel(), aligned.ravel()))
        aurocs["pixel"].append(metrics.pixel_auroc(mask[None], full[None]))
        aligned_text = f" (aligned windows {aurocs['aligned_cell'][-1]:.3f})" if aurocs["aligned_cell"] else ""
        run.log(
            f"[mosaic] mosaic {m + 1}/{c.mosaics}: cell AUROC {aurocs['cell'][-1]:.4f}{aligned_text}, "
            f"pixel AUROC {aurocs['pixel'][-1]:.4f}"
        )
        if m == 0:
            figure = _four_panel_figure(
                run.out_dir / "mosaic.png",
                template,
                inspected,
                full,
                mask,
                f"mosaic 1: cell AUROC {aurocs['cell'][0]:.3f}{aligned_text}, pixel AUROC {aurocs['pixel'][0]:.3f}",
            )
    return {
        "cell_auroc_mean": _mean(aurocs["cell"]),
        "aligned_cell_auroc_mean": _mean(aurocs["aligned_cell"]),
        "pixel_auroc_mean": _mean(aurocs["pixel"]),
        "cell_auroc": aurocs["cell"],
        "aligned_cell_auroc": aurocs["aligned_cell"],
        "pixel_auroc": aurocs["pixel"],
        "mosaics": c.mosaics,
        "grid": MOSAIC_GRID,
        "defect_fraction": 0.5,
        "map_step": detection.step,
        "definitions": {
            "cell_auroc": (
                "cell score = maximum of the full-resolution (bilinear) map inside the cell; label = the "
                "cell got a rectangle. Windows centred near a cell's border also see its neighbour, so a "
                "rectangle raises the maximum of the cells next to it too"
            ),
            "aligned_cell_auroc": (
                "cell score = the network's score for exactly the cell's own 32 x 32 template / "
                "inspected windows (the input it was trained on), from the unpadded sliding map"
            ),
            "pixel_auroc": "the full-resolution map against the rectangles' pixel mask",
        },
        "figures": [figure],
    }


def aligned_cell_scores(net, template: Tensor, inspected: Tensor, grid: int) -> np.ndarray:
    """The network's anomaly score of each cell's own window pair, float64 (grid, grid).

    ``template``, ``inspected``: (C, H, W) in [0, 1] whose ``grid`` x ``grid`` cells are each one
    ``net.window`` square (a mosaic of training-size images). On the unpadded pair, output
    position k of the encoder starts at input pixel ``stride * k`` (see :mod:`.network`), so cell
    (r, c) is output position (r, c) * window / stride: one network pass gives every cell.
    """
    check_int(grid, "grid")
    size = grid * net.window
    if tuple(template.shape[-2:]) != (size, size) or template.shape != inspected.shape:
        raise ValueError(
            f"template and inspected must both be (C, {size}, {size}) for a {grid}x{grid} grid of "
            f"{net.window}-pixel cells, got {tuple(template.shape)} and {tuple(inspected.shape)}"
        )
    step = net.window // net.stride  # the window is a multiple of the stride (NetworkConfig checks it)
    device = _net_device(net)
    with torch.inference_mode():
        scores = net.anomaly(template[None].to(device), inspected[None].to(device))[0]
    return scores[::step, ::step].double().cpu().numpy()


def _four_panel_figure(
    path: Path, template: Tensor, inspected: Tensor, amap: np.ndarray, mask: np.ndarray, title: str, dpi: int = 100
) -> str:
    from matplotlib.figure import Figure

    h, w = amap.shape
    fig = Figure(figsize=(4 * 4.2, 4.2 * h / w + 0.6), layout="constrained")
    axes = fig.subplots(1, 4)
    _panel_row(
        axes,
        [
            ("template", _rgb(template), {}),
            ("inspected", _rgb(inspected), {}),
            ("anomaly map (1 - P(similar))", amap, _map_options(amap)),
            ("ground truth", mask, {"cmap": "gray", "vmin": 0, "vmax": 1}),
        ],
    )
    fig.suptitle(title, fontsize=10)
    return _save_figure(fig, path, dpi)


# ---------------------------------------------------------------------------------------------
# 4. High-resolution aerial images: synthetic rectangles, then real changes


def _change_sets(run: _Run) -> dict[str, Path]:
    root = run.data_root / "change_detection"
    return {name: root / name for name in CHANGE_SETS if (root / name / "A").is_dir()}


def _aerial(run: _Run) -> dict[str, Any]:
    sets = _change_sets(run)
    if not sets:
        raise _Skip(
            f"no change-detection images: {run.data_root / 'change_detection'}/{{{','.join(CHANGE_SETS)}}}/A is missing"
        )
    detector = _require_detector(run, "the aerial experiment")
    synthetic = _aerial_synthetic(run, detector, sets)
    real, figure = _change_detection(run, detector, sets)
    figures = ([synthetic.pop("figure")] if "figure" in synthetic else []) + [figure]
    return {
        "synthetic_pixel_auroc": synthetic.get("pixel_auroc"),
        "megapixels_per_second": synthetic.get("megapixels_per_second"),
        **{f"{name.lower()}_pooled_pixel_auroc": real[name]["pooled_pixel_auroc"] for name in real},
        "synthetic": synthetic,
        "change_detection": real,
        "missing_sets": {name: "no A folder" for name in CHANGE_SETS if name not in sets},
        "note": TRANSFER_NOTE,
        "figures": figures,
    }


def _template_images(sets: dict[str, Path]) -> tuple[list[Tensor], dict[str, str]]:
    """The "before" (A) images of every set that share the commonest size, in set then name
    order, and the others with the reason they are left out (the template's grid needs one size)."""
    from ..data import load_image

    loaded = [
        (f"{name}/{path.name}", load_image(path))
        for name, folder in sets.items()
        for path in sorted((folder / "A").glob("*.png"))
    ]
    if not loaded:
        return [], {}
    shapes = [tuple(image.shape) for _, image in loaded]
    common = max(set(shapes), key=lambda shape: (shapes.count(shape), shape))
    kept = [image for (_, image), shape in zip(loaded, shapes, strict=True) if shape == common]
    left_out = {
        name: f"size {shape[1]}x{shape[2]}, not the commonest {common[1]}x{common[2]}"
        for (name, _), shape in zip(loaded, shapes, strict=True)
        if shape != common
    }
    return kept, left_out


def _aerial_synthetic(run: _Run, detector, sets: dict[str, Path]) -> dict[str, Any]:
    from .pairs import aerial_template, scatter_rectangles

    images, left_out = _template_images(sets)
    # aerial_template tiles the images row-major on a grid that covers the template.
    needed = 1
    if images:
        needed = math.ceil(AERIAL_HEIGHT / images[0].shape[1]) * math.ceil(AERIAL_WIDTH / images[0].shape[2])
    if len(images) < needed:
        reason = (
            f'a {AERIAL_WIDTH}x{AERIAL_HEIGHT} template needs {needed} "before" (A) images of one size, '
            f"found {len(images)}"
        )
        run.log(f"[aerial] synthetic part skipped: {reason}")
        return {"status": "skipped", "reason": reason, "left_out_images": left_out}
    generator = _generator(run.config.seed, _STREAM_AERIAL)
    template = aerial_template(images, height=AERIAL_HEIGHT, width=AERIAL_WIDTH)
    inspected, mask = scatter_rectangles(template, generator, count=AERIAL_RECTANGLES, size=AERIAL_RECTANGLE_SIZE)
    mask = _as_bool_array(mask)
    # A warm-up on a corner, so that the timed call does not pay for first-call allocations.
    detector.detect(template[:, :128, :128], inspected[:, :128, :128])
    if str(detector.device).startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    detection = detector.detect(template, inspected)  # returns a host array: the GPU work is done
    seconds = time.perf_counter() - start
    full = detection.full_resolution()
    auroc = metrics.pixel_auroc(mask[None], full[None])
    height, width = full.shape
    throughput = height * width / 1e6 / seconds
    run.log(
        f"[aerial] synthetic {width}x{height}: pixel AUROC {auroc:.4f}, detection {seconds:.2f} s "
        f"({throughput:.2f} MP/s on {detector.device})"
    )
    figure = _four_panel_figure(
        run.out_dir / "aerial_synthetic.png",
        template,
        inspected,
        full,
        mask,
        f"{width}x{height} aerial template, {AERIAL_RECTANGLES} rectangles: pixel AUROC {auroc:.3f}",
        dpi=150,
    )
    return {
        "status": "done",
        "pixel_auroc": auroc,
        "image_size": [height, width],
        "template_images": needed,
        "left_out_images": left_out,
        "rectangles": AERIAL_RECTANGLES,
        "rectangle_size": list(AERIAL_RECTANGLE_SIZE),
        "defect_pixels": int(mask.sum()),
        "detect_seconds": seconds,
        "megapixels_per_second": throughput,
        "device": str(detector.device),
        "torch_threads": torch.get_num_threads(),
        "map_step": detection.step,
        "figure": figure,
    }


def _change_detection(run: _Run, detector, sets: dict[str, Path]) -> tuple[dict[str, Any], str]:
    from ..data import load_image, load_mask

    results: dict[str, Any] = {}
    shown: list[tuple[str, Tensor, Tensor, np.ndarray, np.ndarray]] = []
    for name, folder in sets.items():
        per_pair: dict[str, float | None] = {}
        skipped: dict[str, str] = {}
        undefined: dict[str, str] = {}
        masks, maps = [], []
        for a_path in sorted((folder / "A").glob("*.png")):
            b_path, label_path = folder / "B" / a_path.name, folder / "label" / a_path.name
            if not b_path.is_file() or not label_path.is_file():
                missing = b_path if not b_path.is_file() else label_path
                skipped[a_path.name] = f"no {'B image' if missing == b_path else 'label'} file ({missing})"
                run.log(f"[aerial] {name}/{a_path.name} skipped: {skipped[a_path.name]}")
                continue
            before, after, label = load_image(a_path), load_image(b_path), load_mask(label_path).numpy()
            if before.shape != after.shape or tuple(before.shape[1:]) != label.shape:
                skipped[a_path.name] = (
                    f"sizes differ: A {tuple(before.shape[1:])}, B {tuple(after.shape[1:])}, label {label.shape}"
                )
                continue
            full = detector.detect(before, after).full_resolution()
            if label.any() and not label.all():
                per_pair[a_path.name] = metrics.pixel_auroc(label[None], full[None])
            else:  # still pooled: its pixels count as negatives (or positives) there
                per_pair[a_path.name] = None
                undefined[a_path.name] = (
                    f"the label marks {'every' if label.all() else 'no'} pixel as changed: AUROC undefined"
                )
            masks.append(label)
            maps.append(full)
            if sum(1 for s in shown if s[0].startswith(name)) < run.config.change_pairs_shown:
                shown.append((f"{name}/{a_path.name}", before, after, full, label))
        both_classes = any(m.any() for m in masks) and not all(m.all() for m in masks)
        pooled = _pooled_pixel_auroc(masks, maps) if both_classes else None
        results[name] = {
            "pooled_pixel_auroc": pooled,
            "mean_pair_pixel_auroc": _mean(list(per_pair.values())),
            "pairs": per_pair,
            "n_pairs": len(per_pair),
            "skipped_pairs": skipped,
            "undefined_pairs": undefined,
        }
        run.log(
            f"[aerial] {name}: {len(per_pair)} pairs, pooled pixel AUROC "
            f"{'n/a' if pooled is None else f'{pooled:.4f}'}" + (f", {len(skipped)} skipped" if skipped else "")
        )
    return results, _change_figure(run.out_dir / "change_detection.png", shown)


def _change_figure(path: Path, shown: list) -> str:
    from matplotlib.figure import Figure

    rows = max(len(shown), 1)
    fig = Figure(figsize=(4 * 3.4, 3.4 * rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, 4, squeeze=False))
    for row, (name, before, after, amap, label) in zip(axes, shown, strict=False):
        # Each map on its own colour scale, stated in its title: on real changes the scores of a
        # network trained on rectangles stay low, and a shared 0-1 scale would show nothing.
        top = max(float(np.max(amap)), 1e-6)
        _panel_row(
            row,
            [
                (f"{name}: A (before)", _rgb(before), {}),
                ("B (after)", _rgb(after), {}),
                (f"anomaly map (colours 0 to {top:.3g})", amap, {"cmap": "jet", "vmin": 0.0, "vmax": top}),
                ("change label", label, {"cmap": "gray", "vmin": 0, "vmax": 1}),
            ],
        )
    fig.suptitle("Real before / after pairs (the network saw only synthetic rectangles in training)", fontsize=10)
    return _save_figure(fig, path)

"""The reproduction's settings (:class:`ReproduceConfig`) and its fixed constants."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastad.checks import check_choice, check_device, check_fraction, check_int, check_positive_float
from fastad.siamese import NetworkConfig

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

# Independent random streams, one per purpose (see common.stream_generator).
STREAM_MNIST_PICKS, STREAM_MOSAIC, STREAM_AERIAL = 1, 2, 3


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
    experiments: which of :data:`EXPERIMENTS` to run (the others are recorded as skipped, "not
        selected"); the mosaic and the aerial experiment need "cifar_learning_curve" beside them,
        which makes (or, with ``cifar_model``, loads) their detector.
    mnist_variants: which of the three MNIST variants (names of :data:`MNIST_VARIANTS`) to train;
        with the paper's 100 epochs each takes 100-130 minutes on two CPU cores, so a long
        reproduction can be split over processes (one variant each, ``OMP_NUM_THREADS=1``).
    mosaics: independent 10 x 10 mosaics behind the numbers (the figure shows the first);
        mosaic_images: "train" (the paper: 100 CIFAR-10 training images) or "test" (unseen ones).
    change_pairs_shown: before / after pairs per set in ``change_detection.png``.
    channels, embed_dim, hidden, batch_size, lr: the networks' widths and training (MNIST uses
        ``channels``, ``hidden``, ``batch_size`` and ``lr`` too, with its 3-D embedding).
    seed: every random draw derives from it. device: "cpu", "cuda" ... progress: progress
        bars (None: only on a terminal).
    """

    data_root: Path = Path("../shared/data")
    experiments: tuple[str, ...] = EXPERIMENTS
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
    mnist_variants: tuple[str, ...] = tuple(name for name, _, _ in MNIST_VARIANTS)
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
        _check_names(self.experiments, "experiments", EXPERIMENTS)
        _check_names(self.mnist_variants, "mnist_variants", tuple(name for name, _, _ in MNIST_VARIANTS))
        needing_detector = [name for name in ("mosaic", "aerial") if name in self.experiments]
        if needing_detector and "cifar_learning_curve" not in self.experiments:
            raise ValueError(
                f"experiments: {' and '.join(needing_detector)} need(s) the CIFAR-10 detector that "
                "'cifar_learning_curve' makes or loads (cifar_model); select it too"
            )
        if self.mnist_similar_fraction is not None:  # None: random pairs
            check_fraction(self.mnist_similar_fraction, "mnist_similar_fraction")
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


def _check_names(names: Any, what: str, known: tuple[str, ...]) -> None:
    """A non-empty tuple or list of distinct names out of ``known``."""
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be a tuple of names out of {', '.join(known)}, got {names!r}")
    if not names:
        raise ValueError(f"{what} is empty; choose from {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{what}: unknown {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names one twice: {list(names)}")

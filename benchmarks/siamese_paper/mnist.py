"""Experiment 1, MNIST: what the three heads learn (3-D embeddings and similarity matrices)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from mpl_toolkits import mplot3d  # noqa: F401  (registers the "3d" projection)
from torch import Tensor

from fastad import metrics
from fastad.siamese import DigitPairs, SiameseDetector, load_mnist
from fastad.viz import save_figure

from .common import Run, Skip, net_device, stream_generator
from .config import MNIST_VARIANTS, STREAM_MNIST_PICKS


def mnist_clustering(run: Run) -> dict[str, Any]:
    c = run.config
    root = run.data_root / "mnist"
    if not root.is_dir():
        raise Skip(f"MNIST not found: {root} is missing")

    try:
        train = load_mnist(root, "train", limit=c.mnist_limit, seed=c.seed)
        test = load_mnist(root, "test", limit=c.mnist_test_limit, seed=c.seed)
    except FileNotFoundError as exc:
        raise Skip(f"MNIST incomplete: {exc}") from None
    train_pairs = DigitPairs(
        train.images, train.labels, c.mnist_pairs, seed=c.seed, similar_fraction=c.mnist_similar_fraction
    )
    heldout = DigitPairs(test.images, test.labels, c.mnist_heldout_pairs, seed=c.seed + 1, similar_fraction=0.5)
    run.log(
        f"[mnist_clustering] {len(train)} training digits, {len(train_pairs)} pairs per epoch, "
        f"{len(heldout)} held-out pairs from {len(test)} test digits"
    )

    generator = stream_generator(c.seed, STREAM_MNIST_PICKS)
    scatter_index = torch.randperm(len(train), generator=generator)[: c.mnist_scatter]
    matrix_index = _per_class_picks(test.labels, c.similarity_per_digit, generator)

    variants: dict[str, Any] = {}
    embeddings, matrices = {}, {}
    for name, head, loss in MNIST_VARIANTS:
        if name not in c.mnist_variants:
            continue
        detector = SiameseDetector(
            window=28, in_channels=1, embed_dim=3, head=head, loss=loss, epochs=c.mnist_epochs, **run.detector_kwargs()
        )
        detector.train(
            train_pairs,
            heldout,
            normalization_images=train.images,
            progress=c.progress,
            log=run.epoch_logger(f"mnist_clustering {name}"),
            checkpoint=run.checkpoint(f"mnist_{name}"),
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
        "similar_fraction": c.mnist_similar_fraction,
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


def _embed_digits(net, images: Tensor, batch: int = 1024) -> np.ndarray:
    """uint8 (N, 1, 28, 28) -> float (N, D) embeddings (the 1 x 1 output grid flattened)."""
    out = []
    with torch.inference_mode():
        for chunk in images.split(batch):
            out.append(net.embed(chunk.to(net_device(net), torch.float32) / 255).flatten(1).cpu())
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
        f = net.embed(images.to(net_device(net), torch.float32) / 255)
        n = f.shape[0]
        s = _similarity_from(net, f.repeat_interleave(n, 0), f.repeat(n, 1, 1, 1), margin)
    return s.reshape(n, n).cpu().numpy()


def _pair_similarities(net, pairs, margin: float, batch: int) -> tuple[float | None, float | None, float | None]:
    """(mean similarity of similar pairs, of dissimilar pairs, AUROC of 1 - similarity for
    dissimilar vs similar) over all held-out pairs (as drawn for epoch 0)."""
    pairs.set_epoch(0)
    scores, labels = [], []
    device = net_device(net)
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
    return save_figure(fig, path)


def _similarity_figure(path: Path, matrices: dict[str, np.ndarray], labels: np.ndarray) -> str:

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
    return save_figure(fig, path)

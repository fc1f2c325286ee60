"""Experiment 2, CIFAR-10: training the detector on pairs with synthetic rectangles (or reading
a given model's recorded history), and the learning curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastad.siamese import RectanglePairs, SiameseDetector
from fastad.viz import learning_curve_figure

from .common import Run, Skip


def cifar_learning_curve(run: Run) -> dict[str, Any]:

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
        detector, info = train_cifar(run)
        history = detector.history_
    figure = learning_curve_figure(
        run.out_dir / "cifar_learning_curve.png", history, "Siamese network on CIFAR-10 pairs with synthetic rectangles"
    )
    return {
        "final_train_loss": history.train_loss[-1] if history.train_loss else None,
        "final_heldout_loss": history.heldout_loss[-1] if history.heldout_loss else None,
        "final_heldout_accuracy": history.heldout_accuracy[-1] if history.heldout_accuracy else None,
        "epochs": len(history.train_loss),
        **history.to_dict(),
        **info,
        "figures": [figure],
    }


def train_cifar(run: Run):
    c = run.config
    if not run.cifar_zip.is_file():
        raise Skip(f"CIFAR-10 not found: {run.cifar_zip} is missing (or pass cifar_model to reuse a trained detector)")

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
        "command": "benchmarks.siamese_paper",
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
        checkpoint=run.checkpoint("cifar"),
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


def require_detector(run: Run, what: str):
    if run.cifar_detector is None:
        reason = run.cifar_skip_reason or "experiment 2 did not run"
        raise Skip(f"{what} needs the CIFAR-10 detector of experiment 2, which was not made ({reason})")
    return run.cifar_detector

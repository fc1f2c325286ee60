"""The fully-convolutional Siamese network: template vs inspected image.

- :mod:`.network`: the shared all-convolutional encoder and the per-position discriminator;
- :mod:`.losses`: contrastive and binary cross-entropy losses;
- :mod:`.sources`, :mod:`.rectangles`, :mod:`.pairs`: labelled image collections (CIFAR-10 zip /
  ImageFolder, MNIST idx), the synthetic rectangle defect, and training pairs;
- :mod:`.training`: the Adam training loop with held-out loss per epoch;
- :mod:`.checkpoint`: the per-epoch training checkpoint a stopped training resumes from;
- :mod:`.sliding`: exact sliding inference on pairs of any size, tiled for images beyond memory;
- :mod:`.detector`: :class:`SiameseDetector` (train / save / load / pretrained / predict / detect),
  an estimator like the other methods (``fastad.estimator``);
- :mod:`.cli`: ``fastad siamese train | detect``.

The paper's experiments are outside the library: ``python -m benchmarks.siamese_paper``.
"""

from __future__ import annotations

from .checkpoint import CheckpointError
from .detector import PRETRAINED_COMMAND, PRETRAINED_PATH, Detection, SiameseDetector
from .losses import bce_loss, contrastive_loss, siamese_loss
from .network import NetworkConfig, SiameseNet, SiameseOutput
from .pairs import DigitPairs, RectanglePairs
from .rectangles import BLUE, Box, paint_rectangle, sample_rectangle
from .sliding import detect_tiled, score_map
from .sources import LabelledImages, load_image_folder, load_mnist
from .training import TrainingHistory, train_network

__all__ = [
    "BLUE",
    "Box",
    "CheckpointError",
    "Detection",
    "DigitPairs",
    "LabelledImages",
    "RectanglePairs",
    "NetworkConfig",
    "PRETRAINED_COMMAND",
    "PRETRAINED_PATH",
    "SiameseDetector",
    "SiameseNet",
    "SiameseOutput",
    "TrainingHistory",
    "bce_loss",
    "contrastive_loss",
    "detect_tiled",
    "load_image_folder",
    "load_mnist",
    "paint_rectangle",
    "sample_rectangle",
    "score_map",
    "siamese_loss",
    "train_network",
]

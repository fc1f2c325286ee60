"""The Siamese network paper's four experiments as one command: figures (PNG) and ``results.json``.

    python -m benchmarks.siamese_paper --out DIR [--data ROOT] [--cifar-model M|shipped] [--quick] [--set key=value ...]

Experiment code, not library code: it uses only what ``fastad`` exports (``fastad.siamese``,
``fastad.metrics``, ``fastad.viz``); its scene generators live in :mod:`.scenes`.

1. ``mnist_clustering``: three networks with a 3-D embedding on MNIST digit pairs (same digit =
   similar; 50,000 random pairs an epoch, about 10 % similar, 100 epochs, as the paper): (a) no
   discriminator, contrastive loss; (b) "concat" discriminator, BCE; (c) "distance"
   discriminator (on the Euclidean distance of Eq. 1), BCE. Figures: the embeddings of training
   digits in 3-D and the similarity matrices of unseen digits. Numbers: held-out pair accuracy,
   mean similarity of same-digit and different-digit test pairs, pair AUROC.
2. ``cifar_learning_curve``: the detector trained on CIFAR-10 pairs with synthetic rectangles,
   held-out loss and accuracy on test-set pairs per epoch (or a given model's recorded history).
3. ``mosaic``: 100 CIFAR-10 training images (as the paper; ``mosaic_images="test"``: unseen ones)
   on a 10 x 10 grid as template, rectangles in half of the cells as inspected; cell-level and
   pixel-level AUROC over several mosaics.
4. ``aerial``: a 1260 x 720 template built from the change-detection "before" images, 100 small
   rectangles scattered over it (pixel AUROC, throughput in megapixels per second), then the
   real before / after pairs of LEVIR-CD and DSIFN-CD against their change masks.

``--set experiments=...`` and ``--set mnist_variants=...`` run a part (the paper's 100 MNIST epochs
take more than an hour per variant on two CPU cores); a part gives the numbers it has in the
whole run. Each experiment that lacks its data is recorded as skipped with the reason (in
``results.json`` and the log) while the others run. Every random draw comes from a seeded
``torch.Generator`` or a pair source's own seed, so a rerun with the same configuration gives the
same numbers.
Figures are drawn on bare matplotlib ``Figure`` objects (no pyplot, no global backend change)
and every file is written atomically.
"""

from __future__ import annotations

from .common import cell_scores
from .config import EXPERIMENTS, ReproduceConfig
from .driver import reproduce
from .mosaic import aligned_cell_scores

__all__ = ["EXPERIMENTS", "ReproduceConfig", "aligned_cell_scores", "cell_scores", "reproduce"]

"""Metrics at evaluation scale: 200 anomaly maps of 512 x 512 (52 M pixels).

fastad.metrics against scikit-learn's roc_auc_score on the same pooled pixels (the usual way), and
AUPRO against the per-threshold loop that evaluation scripts commonly use (here with 100
thresholds, an approximation; fastad's is exact over every distinct score), on the first N_AUPRO
maps so that the loop finishes in reasonable time.
Run with `make bench` (or `pytest benchmarks -k metrics --benchmark-only`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastad import metrics

N, H, W = 200, 512, 512
# The threshold loop costs minutes on all N maps; the AUPRO pair runs on the first N_AUPRO.
N_AUPRO = 40


@pytest.fixture(scope="module")
def maps_and_masks():
    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(N, H, W, dtype=torch.bool)
    for i in range(0, N, 2):  # every other image has a rectangular defect
        y, x = torch.randint(0, H - 64, (2,), generator=gen).tolist()
        masks[i, y : y + 48, x : x + 64] = True
    maps = torch.rand(N, H, W, generator=gen) + 0.5 * masks
    return maps, masks


def aupro_threshold_loop(masks: np.ndarray, maps: np.ndarray, steps: int = 100, fpr_limit: float = 0.3) -> float:
    """The common evaluation-script way: PRO and FPR at `steps` evenly spaced thresholds."""
    from scipy import ndimage

    labelled = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    normal = ~masks
    fprs, pros = [], []
    for t in np.linspace(maps.max(), maps.min(), steps):
        hit = maps >= t
        fprs.append((hit & normal).sum() / normal.sum())
        overlaps = [hit[i][lab == r].mean() for i, lab in enumerate(labelled) for r in range(1, lab.max() + 1)]
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= fpr_limit
    return float(np.trapezoid(pros[keep], fprs[keep]) / fpr_limit)


def test_pixel_auroc_fastad(benchmark, record, maps_and_masks):
    maps, masks = maps_and_masks
    benchmark.group = f"pixel AUROC, {N} maps {H}x{W}"
    benchmark.pedantic(metrics.pixel_auroc, args=(masks, maps), rounds=2, iterations=1)
    record(benchmark, benchmark.group, "fastad.metrics.pixel_auroc", 0.0)


def test_pixel_auroc_sklearn(benchmark, record, maps_and_masks):
    sklearn = pytest.importorskip("sklearn.metrics")
    maps, masks = maps_and_masks
    benchmark.group = f"pixel AUROC, {N} maps {H}x{W}"
    benchmark.pedantic(
        sklearn.roc_auc_score, args=(masks.numpy().ravel(), maps.numpy().ravel()), rounds=2, iterations=1
    )
    record(benchmark, benchmark.group, "sklearn roc_auc_score", 0.0)


def test_aupro_fastad(benchmark, record, maps_and_masks):
    maps, masks = (t[:N_AUPRO] for t in maps_and_masks)
    benchmark.group = f"AUPRO (FPR <= 0.3), {N_AUPRO} maps {H}x{W}"
    benchmark.pedantic(metrics.aupro, args=(masks, maps), rounds=2, iterations=1)
    record(benchmark, benchmark.group, "fastad.metrics.aupro (exact)", 0.0)


def test_aupro_threshold_loop(benchmark, record, maps_and_masks):
    maps, masks = (t[:N_AUPRO] for t in maps_and_masks)
    benchmark.group = f"AUPRO (FPR <= 0.3), {N_AUPRO} maps {H}x{W}"
    benchmark.pedantic(aupro_threshold_loop, args=(masks.numpy(), maps.numpy()), rounds=1, iterations=1)
    record(benchmark, benchmark.group, "100-threshold loop (approximate)", 0.0)

"""Evaluation metrics of anomaly detection: image and pixel AUROC, AUPRO, best F1, ROC curves.

Every function accepts numpy arrays or torch tensors (any device; they are copied to the host) and
treats a higher score as more anomalous. Labels and masks mark anomalies with 1 / True.

Every result is exact, ties included (a tie between an anomalous and a normal entry counts half,
as in scikit-learn), and costs a sort, never a loop over thresholds:

* AUROC is the Mann-Whitney statistic: sort each class, then count for every entry of one class
  the entries of the other below and equal to it (``searchsorted``), summed in int64;
* ROC curves and F1 sort the scores once and read cumulative counts at every distinct score;
* AUPRO sorts the normal pixels that matter (those above the FPR limit) and places every defect
  pixel among them, each weighted by its share of its region (see :func:`aupro`).

numpy's plain ``sort`` is vectorised and many times faster than ``argsort``, which is why the
pixel metrics are built on sorted values rather than on a permutation of all pixels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.ndimage

__all__ = ["image_auroc", "pixel_auroc", "aupro", "best_f1", "roc_curve"]

# 8-connectivity in each image and none across images: the middle plane of a 3x3x3 structure.
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_PER_IMAGE[1] = True


# ----------------------------------------------------------------------------------------------
# Input conversion and checks


def _to_numpy(value: Any, name: str) -> np.ndarray:
    """A host numpy view (or copy) of a tensor / array / sequence, without changing its values."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency, but metrics do not need it
        torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()  # numpy has no bfloat16; float32 holds both exactly
        return value.numpy()
    array = np.asarray(value)
    if array.dtype == object:
        raise TypeError(f"{name} must be a numeric array or tensor, got {type(value).__name__}")
    return array


def _check_scores(value: Any, name: str, ndim: int) -> np.ndarray:
    """Real-valued, finite scores with ``ndim`` dimensions, in their own dtype (integer or
    floating: only the order of the values matters, so nothing is converted)."""
    array = _to_numpy(value, name)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(array.shape)}")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        if np.isnan(array).any():
            raise ValueError(f"{name} contains NaN")
        raise ValueError(f"{name} contains infinite values; scores must be finite")
    return array


def _check_binary(value: Any, name: str, ndim: int) -> np.ndarray:
    """A boolean array from bool or 0/1 input with ``ndim`` dimensions."""
    array = _to_numpy(value, name)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(array.shape)}")
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise TypeError(f"{name} must be boolean or 0/1 numbers, got dtype {array.dtype}")
    is_one = array == 1
    if not np.logical_or(is_one, array == 0).all():
        bad = np.unique(array[~np.logical_or(is_one, array == 0)])[:5]
        raise ValueError(f"{name} must contain only 0 and 1 (or booleans), found {bad.tolist()}")
    return is_one


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_both_classes(positive: np.ndarray, name: str, what: str = "AUROC") -> None:
    n_pos = int(np.count_nonzero(positive))
    if n_pos == 0 or n_pos == positive.size:
        kind = "anomalous (1)" if n_pos == 0 else "normal (0)"
        raise ValueError(f"{what} is undefined: {name} has no {kind} entries; both classes are needed")


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _check_binary(labels, "labels", 1)
    s = _check_scores(scores, "scores", 1)
    _check_same_shape(y, s, "labels", "scores")
    return y, s


def _pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    m = _check_binary(masks, "masks", 3)
    s = _check_scores(maps, "maps", 3)
    _check_same_shape(m, s, "masks", "maps")
    return m, s


# ----------------------------------------------------------------------------------------------
# Sort-based counting


def _roc_counts(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positives of ``score >= t`` at every distinct score ``t``, from one sort.

    Returns:
        ``(fps, tps, thresholds)``: int64 counts and the distinct scores, thresholds descending.
    """
    order = np.argsort(scores)[::-1]
    ordered = scores[order]
    # The last position of each run of equal scores: where the cumulative counts are read.
    ends = np.append(np.flatnonzero(ordered[1:] != ordered[:-1]), ordered.size - 1)
    tps = np.cumsum(positive[order], dtype=np.int64)[ends]
    fps = ends.astype(np.int64) + 1 - tps
    return fps, tps, ordered[ends]


def _auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Exact AUROC (Mann-Whitney U / (P N), ties count half) of 1-D ``scores``."""
    high = np.sort(scores[positive])
    low = np.sort(scores[~positive])
    # Place the smaller class among the larger one (sorted needles search fastest); for every
    # entry, 2 x (below + half of equal) = left + right insertion points, an exact integer.
    if high.size <= low.size:
        doubled = _doubled_ranks(high, low)
    else:
        doubled = 2 * high.size * low.size - _doubled_ranks(low, high)
    return doubled / (2 * high.size * low.size)


def _doubled_ranks(needles: np.ndarray, haystack: np.ndarray) -> int:
    """Sum over ``needles`` of 2 x #(haystack < x) + #(haystack == x); both arrays sorted."""
    left = np.searchsorted(haystack, needles, side="left")
    right = np.searchsorted(haystack, needles, side="right")
    # Each sum is at most P * N, far below int64's 9.2e18 for any arrays that fit in memory.
    return int(left.sum(dtype=np.int64)) + int(right.sum(dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# Public metrics


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve at every distinct score, as ``sklearn.metrics.roc_curve(...,
    drop_intermediate=False)`` gives it.

    Args:
        labels: (N,) 0/1 or bool, both classes present.
        scores: (N,) real, finite; higher = more anomalous.

    Returns:
        ``(fpr, tpr, thresholds)``, float64 arrays of length (distinct scores + 1): the first
        point is (0, 0) at threshold ``+inf``; then thresholds descend through every distinct
        score and ``fpr``/``tpr`` are the rates of ``score >= threshold``, ending at (1, 1).
    """
    positive, s = _image_inputs(labels, scores)
    _check_both_classes(positive, "labels", "the ROC curve")
    fps, tps, thresholds = _roc_counts(positive, s)
    fpr = np.concatenate(([0.0], fps / fps[-1]))
    tpr = np.concatenate(([0.0], tps / tps[-1]))
    return fpr, tpr, np.concatenate(([np.inf], thresholds.astype(np.float64)))


def image_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of image scores; ties count half (as ``roc_auc_score``).

    Args:
        labels: (N,) 0/1 or bool, 1 = anomalous; both classes present.
        scores: (N,) real, finite.

    Returns:
        AUROC in [0, 1] (float): the probability that a random anomalous image scores above a
        random normal one, plus half the probability of a tie.
    """
    positive, s = _image_inputs(labels, scores)
    _check_both_classes(positive, "labels")
    return _auroc(positive, s)


def pixel_auroc(masks: Any, maps: Any) -> float:
    """AUROC of all pixels of all images pooled together.

    Args:
        masks: (N, H, W) bool or 0/1, True = defective pixel; both classes present overall.
        maps: (N, H, W) real, finite anomaly maps.

    Returns:
        The AUROC (float) of the flattened ``maps`` against the flattened ``masks``.
    """
    positive, s = _pixel_inputs(masks, maps)
    _check_both_classes(positive, "masks")
    return _auroc(positive.ravel(), s.ravel())


def best_f1(labels: Any, scores: Any) -> tuple[float, float]:
    """The highest F1 over all decision rules ``score >= t``, and the threshold reaching it.

    Args:
        labels: (N,) 0/1 or bool with at least one anomalous (1) entry (F1 needs positives;
            normal entries may be absent).
        scores: (N,) real, finite.

    Returns:
        ``(f1, threshold)``: ``threshold`` is a score value, the smallest score among the
        entries predicted anomalous at the optimum. Where several thresholds give the same best
        F1, the highest of them is returned (the fewest alarms).
    """
    positive, s = _image_inputs(labels, scores)
    n_pos = int(np.count_nonzero(positive))
    if n_pos == 0:
        raise ValueError("F1 is undefined: labels has no anomalous (1) entries")
    fps, tps, thresholds = _roc_counts(positive, s)
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P), from exact integer counts: equal
    # fractions round to equal floats, so the tie rule below is exact.
    f1 = 2.0 * tps / (tps + fps + n_pos)
    best = int(np.argmax(f1))  # the first maximum in descending thresholds = the highest one
    return float(f1[best]), float(thresholds[best])


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit`` (MVTec AD).

    Regions are the 8-connected components of each image's mask. At a threshold ``t``:
    ``PRO(t)`` is the mean over all regions (of all images) of the share of the region's pixels
    with score >= t, and ``FPR(t)`` is the share of all normal pixels (outside every mask, in all
    images, defect-free ones included) with score >= t. The curve joins (0, 0) and the
    (FPR, PRO) points of every distinct score (ending at (1, 1)) with straight lines; it is
    integrated with the trapezoid rule from FPR 0 to ``fpr_limit`` (linear interpolation at the
    limit) and divided by ``fpr_limit``, so a perfect detector scores 1.0 and a constant map
    ``fpr_limit / 2``.

    Args:
        masks: (N, H, W) bool or 0/1, True = defective pixel.
        maps: (N, H, W) real, finite anomaly maps.
        fpr_limit: upper FPR of the integration, in (0, 1].

    Returns:
        AUPRO in [0, 1] (float).

    Raises:
        ValueError: no defect region in ``masks`` (PRO undefined), no normal pixel (FPR
            undefined), ``fpr_limit`` outside (0, 1], or the shape / dtype / NaN checks.
    """
    defect, s = _pixel_inputs(masks, maps)
    if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float, np.integer, np.floating)):
        raise TypeError(f"fpr_limit must be a number, got {type(fpr_limit).__name__}")
    limit = float(fpr_limit)
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    regions, n_regions = scipy.ndimage.label(defect, structure=_EIGHT_CONNECTED_PER_IMAGE)
    if n_regions == 0:
        raise ValueError("AUPRO is undefined: masks has no defect region (no True pixel)")
    regions, s = regions.ravel(), s.ravel()
    normal = regions == 0
    # A fresh copy (boolean indexing), so it is sorted in place below: a second copy of every
    # normal pixel costs as much as the sort itself.
    sorted_normal = s[normal]
    n_normal = sorted_normal.size
    if n_normal == 0:
        raise ValueError("AUPRO is undefined: masks has no normal pixel (every pixel is defective)")

    # Each defect pixel carries 1 / (n_regions * its region's size), so PRO(t) is the sum of
    # the weights of the defect pixels scoring >= t: every region's overlap in one sum.
    defect_regions = regions[~normal]
    weights = 1.0 / (n_regions * np.bincount(defect_regions).astype(np.float64))[defect_regions]
    defect_scores = s[~normal]

    # The curve crosses the limit inside the run of normal pixels tied at `crossing`, the
    # (m + 1)-th highest normal score, where m is the most normal pixels an FPR <= limit allows;
    # only the normal pixels above it are integrated in full.
    sorted_normal.sort()
    m = _most_pixels_within(limit, n_normal)
    if m < n_normal:
        crossing = sorted_normal[n_normal - 1 - m]
        tied_from = int(np.searchsorted(sorted_normal, crossing, side="left"))
        above = sorted_normal[int(np.searchsorted(sorted_normal, crossing, side="right")) :]
    else:
        crossing, above = None, sorted_normal

    # Area of the curve over the normal pixels in `above`: the run of n_v normal pixels tied at
    # v is a segment dx = n_v / n_normal wide whose height goes from PRO(> v) to PRO(>= v), so it
    # adds n_v / n_normal * (PRO(> v) + PRO(>= v)) / 2. Summed the other way round: every defect
    # pixel at d adds its weight x (#above < d + #above <= d) / (2 n_normal).
    relevant = defect_scores > crossing if crossing is not None else slice(None)
    order = np.argsort(defect_scores[relevant])
    needles, needle_weights = defect_scores[relevant][order], weights[relevant][order]
    counts = np.searchsorted(above, needles, side="left") + np.searchsorted(above, needles, side="right")
    area = float(np.dot(needle_weights, counts)) / (2.0 * n_normal)

    if crossing is not None:
        # The crossing run: a straight segment from (x0, y0) to (x1, y0 + tied defect weight),
        # cut at the limit.
        x0 = above.size / n_normal
        x1 = (n_normal - tied_from) / n_normal
        y0 = float(needle_weights.sum())
        rise = float(weights[defect_scores == crossing].sum())  # defect pixels tied with it
        y_limit = y0 + rise * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2.0
    return min(area / limit, 1.0)  # float sums could land a hair above 1


def _most_pixels_within(limit: float, n_normal: int) -> int:
    """The largest m <= n_normal with m / n_normal <= limit, as the float comparison sees it."""
    m = min(n_normal, math.floor(limit * n_normal))
    while m < n_normal and (m + 1) / n_normal <= limit:
        m += 1
    while m > 0 and m / n_normal > limit:
        m -= 1
    return m

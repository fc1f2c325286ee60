"""fastad.metrics against scikit-learn, brute force over thresholds and a slow AUPRO written out
step by step, on fresh random inputs (with and without ties), hand-computed cases and bad input."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import scipy.ndimage
import torch

from fastad import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.fixture
def np_rng(rng: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from the conftest's fresh seed (``rng.initial_seed()``)."""
    return np.random.default_rng(rng.initial_seed())


def random_image_case(np_rng: np.random.Generator, n: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    labels = np_rng.integers(0, 2, n)
    labels[:2] = [0, 1]  # both classes, always
    if ties:
        scores = np_rng.integers(0, 5, n) + labels  # few distinct values, ties across classes
    else:
        scores = np_rng.normal(size=n) + 0.7 * labels
    return labels, scores


# ----------------------------------------------------------------------------------------------
# AUROC and ROC curve


@pytest.mark.parametrize("ties", [True, False], ids=["ties", "distinct"])
@pytest.mark.parametrize("n", [2, 3, 17, 500])
def test_image_auroc_matches_sklearn(np_rng, n, ties):
    labels, scores = random_image_case(np_rng, n, ties)
    expected = sklearn_metrics.roc_auc_score(labels, scores)
    assert metrics.image_auroc(labels, scores) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_image_auroc_accepts_tensors_and_bool_labels(np_rng):
    labels, scores = random_image_case(np_rng, 300, ties=False)
    expected = sklearn_metrics.roc_auc_score(labels, scores)
    as_tensors = metrics.image_auroc(torch.from_numpy(labels).bool(), torch.from_numpy(scores).float())
    assert as_tensors == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores.astype(np.float32)), rel=1e-12)
    assert metrics.image_auroc(labels.astype(bool), scores) == pytest.approx(expected, rel=1e-12)


def test_image_auroc_hand_cases():
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert metrics.image_auroc([0, 1, 0, 1], [5, 5, 5, 5]) == 0.5  # all tied: chance
    assert metrics.image_auroc([0, 1, 1], [1.0, 1.0, 2.0]) == 0.75  # one win, one tie


@pytest.mark.parametrize("ties", [True, False], ids=["ties", "distinct"])
def test_pixel_auroc_matches_sklearn_on_pooled_pixels(np_rng, ties):
    masks = np_rng.random((4, 13, 11)) < 0.2
    masks[0, 0, 0], masks[0, 0, 1] = True, False
    if ties:
        maps = np_rng.integers(0, 6, masks.shape).astype(np.float32) + masks
    else:
        maps = np_rng.normal(size=masks.shape) + masks
    expected = sklearn_metrics.roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected, rel=1e-12)
    as_tensors = metrics.pixel_auroc(torch.from_numpy(masks).to(torch.uint8), torch.from_numpy(maps))
    assert as_tensors == pytest.approx(expected, rel=1e-12)


def test_pixel_auroc_with_more_anomalous_than_normal_pixels(np_rng):
    # The smaller class is placed among the larger one; here the defect pixels are the larger.
    masks = np_rng.random((3, 9, 9)) < 0.8
    masks[0, 0, 0], masks[0, 0, 1] = True, False
    maps = np_rng.integers(0, 4, masks.shape) + masks
    expected = sklearn_metrics.roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("ties", [True, False], ids=["ties", "distinct"])
def test_roc_curve_matches_sklearn(np_rng, ties):
    labels, scores = random_image_case(np_rng, 200, ties)
    fpr, tpr, thresholds = metrics.roc_curve(labels, scores)
    fpr_ref, tpr_ref, thresholds_ref = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr_ref, rtol=1e-15, atol=0)
    np.testing.assert_allclose(tpr, tpr_ref, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(thresholds, thresholds_ref)
    assert fpr.dtype == tpr.dtype == thresholds.dtype == np.float64


# ----------------------------------------------------------------------------------------------
# Best F1


def brute_force_best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[Fraction, float]:
    """Exact F1 of ``score >= t`` for every distinct score t; the best, and the highest t reaching it."""
    best, best_t = Fraction(-1), None
    for t in sorted(set(scores.tolist()), reverse=True):
        predicted = scores >= t
        tp = int(np.sum(predicted & (labels == 1)))
        fp = int(np.sum(predicted & (labels == 0)))
        fn = int(np.sum(~predicted & (labels == 1)))
        f1 = Fraction(2 * tp, 2 * tp + fp + fn)
        if f1 > best:
            best, best_t = f1, t
    return best, best_t


@pytest.mark.parametrize("ties", [True, False], ids=["ties", "distinct"])
@pytest.mark.parametrize("n", [2, 9, 150])
def test_best_f1_matches_brute_force(np_rng, n, ties):
    labels, scores = random_image_case(np_rng, n, ties)
    f1, threshold = metrics.best_f1(labels, scores)
    expected_f1, expected_t = brute_force_best_f1(labels, scores)
    assert f1 == pytest.approx(float(expected_f1), rel=1e-12)
    assert threshold == expected_t
    # The threshold is one of the scores, and scikit-learn agrees on the F1 it gives.
    assert threshold in scores
    assert sklearn_metrics.f1_score(labels, scores >= threshold) == pytest.approx(f1, rel=1e-12)


def test_best_f1_hand_cases():
    assert metrics.best_f1([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == (1.0, 0.3)
    # Only positives: everything flagged at the lowest score is perfect.
    assert metrics.best_f1([1, 1], [2.0, 3.0]) == (1.0, 2.0)
    # F1 ties between t = 3 (tp 1, fp 0: 2/3) and t = 1 (tp 2, fp 2: 2/3): the higher wins.
    assert metrics.best_f1([1, 0, 0, 1], [3.0, 2.0, 2.0, 1.0]) == (pytest.approx(2 / 3), 3.0)


# ----------------------------------------------------------------------------------------------
# AUPRO


def slow_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """The definition, step by step: every distinct score as a threshold, regions from
    scipy.ndimage.label per image (8-connectivity), the curve integrated with numpy."""
    regions = []
    for image, mask in enumerate(masks):
        labelled, count = scipy.ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        regions += [(image, labelled == r) for r in range(1, count + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        flagged = maps >= t
        fprs.append(np.sum(flagged & normal) / np.sum(normal))
        pros.append(np.mean([np.sum(flagged[image][region]) / np.sum(region) for image, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    inside = fprs <= fpr_limit
    x, y = fprs[inside], pros[inside]
    if x[-1] < fpr_limit:  # the next point lies beyond the limit: cut that segment there
        after = np.flatnonzero(~inside)[0]
        y_cut = np.interp(fpr_limit, fprs[after - 1 : after + 1], pros[after - 1 : after + 1])
        x, y = np.append(x, fpr_limit), np.append(y, y_cut)
    return float(np.trapezoid(y, x)) / fpr_limit


def random_aupro_case(np_rng: np.random.Generator, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """Several images with several regions each (two touching only at a corner), one without any."""
    n, h, w = 4, 14, 12
    masks = np.zeros((n, h, w), dtype=bool)
    for image in range(1, n):
        for _ in range(np_rng.integers(1, 4)):
            r, c = np_rng.integers(0, h - 2), np_rng.integers(0, w - 2)
            masks[image, r : r + np_rng.integers(1, 4), c : c + np_rng.integers(1, 4)] = True
    # Diagonal neighbours: one region under 8-connectivity, two under 4-connectivity.
    masks[1, 10:12, 0:2] = True
    masks[1, 12:14, 2:5] = True
    masks[1, 12, 0:2] = masks[1, 10:12, 2] = False
    masks[2] |= np_rng.random((h, w)) < 0.08  # scattered single pixels, many diagonal contacts
    # Image 0 has no defect at all.
    if ties:
        maps = (np_rng.integers(0, 5, masks.shape) + 2 * masks * np_rng.integers(0, 2, masks.shape)).astype(np.float64)
    else:
        maps = np_rng.normal(size=masks.shape) + masks * np_rng.uniform(0, 2, masks.shape)
    return masks, maps


@pytest.mark.parametrize("ties", [True, False], ids=["ties", "distinct"])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0, "random"])
def test_aupro_matches_slow_definition(np_rng, ties, fpr_limit):
    masks, maps = random_aupro_case(np_rng, ties)
    if fpr_limit == "random":
        fpr_limit = float(np_rng.uniform(0.01, 1.0))
    expected = slow_aupro(masks, maps, fpr_limit)
    assert metrics.aupro(masks, maps, fpr_limit) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_aupro_limit_exactly_on_a_curve_point(np_rng):
    # fpr_limit equal to k / n_normal: the curve has a point exactly at the limit.
    masks, maps = random_aupro_case(np_rng, ties=True)
    n_normal = int(np.sum(~masks))
    for k in (1, n_normal // 4, n_normal // 2):
        expected = slow_aupro(masks, maps, k / n_normal)
        assert metrics.aupro(masks, maps, k / n_normal) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_aupro_accepts_tensors(np_rng):
    masks, maps = random_aupro_case(np_rng, ties=False)
    expected = metrics.aupro(masks, maps.astype(np.float32))
    assert metrics.aupro(torch.from_numpy(masks), torch.from_numpy(maps).float()) == expected
    assert metrics.aupro(torch.from_numpy(masks).long(), torch.from_numpy(maps).float()) == expected


def test_aupro_perfect_detector_is_one(np_rng):
    masks, maps = random_aupro_case(np_rng, ties=True)
    # Every defect pixel above every normal pixel (ties among the defect pixels are harmless).
    perfect = np.where(masks, 10 + np_rng.integers(0, 3, masks.shape), np_rng.random(masks.shape))
    for limit in (0.3, 0.01, 1.0):
        assert metrics.aupro(masks, perfect, limit) == pytest.approx(1.0, abs=1e-12)
    assert metrics.aupro(masks, -perfect, 0.3) == 0.0  # the opposite: every defect pixel last


@pytest.mark.parametrize("fpr_limit", [0.3, 0.1, 1.0])
def test_aupro_constant_map_is_half_the_limit(fpr_limit):
    # One threshold: the curve is the straight line from (0, 0) to (1, 1).
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 1:3, 1:4] = True
    masks[1, 4, 4] = True
    assert metrics.aupro(masks, np.full(masks.shape, 0.5), fpr_limit) == pytest.approx(fpr_limit / 2, rel=1e-12)


def test_aupro_uses_8_connectivity():
    # A 2x2 and a 3x3 square touching at one corner are one region of 13 pixels. Only the 2x2
    # square scores high, so PRO jumps to 4/13 at FPR 0 (with 4-connectivity it would be
    # (1 + 0) / 2), then runs straight to (1, 1).
    masks = np.zeros((1, 7, 7), dtype=bool)
    masks[0, 0:2, 0:2] = True
    masks[0, 2:5, 2:5] = True
    maps = np.where(np.arange(7)[:, None] < 2, 1.0, 0.0) * np.where(np.arange(7)[None, :] < 2, 1.0, 0.0)
    maps = maps[None]
    pro = 4 / 13
    assert metrics.aupro(masks, maps, 1.0) == pytest.approx((pro + 1) / 2, rel=1e-12)
    assert metrics.aupro(masks, maps, 0.3) == pytest.approx(pro + (1 - pro) * 0.15, rel=1e-12)


def test_aupro_does_not_join_regions_across_images():
    # The same pixel defective in two images: two regions, one found, one missed.
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[:, 1, 1] = True
    maps = np.zeros((2, 4, 4))
    maps[0, 1, 1] = 1.0
    assert metrics.aupro(masks, maps, 1.0) == pytest.approx((0.5 + 1) / 2, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Bad input


GOOD_LABELS, GOOD_SCORES = np.array([0, 1, 0, 1]), np.array([0.1, 0.4, 0.35, 0.8])
IMAGE_FUNCTIONS = [metrics.image_auroc, metrics.best_f1, metrics.roc_curve]


@pytest.mark.parametrize("function", IMAGE_FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("labels", "scores", "error", "match"),
    [
        (GOOD_LABELS[:3], GOOD_SCORES, ValueError, "same shape"),
        (GOOD_LABELS, GOOD_SCORES[:, None], ValueError, "scores must be 1-D"),
        (GOOD_LABELS[None], GOOD_SCORES, ValueError, "labels must be 1-D"),
        (np.array([0, 1, 2, 1]), GOOD_SCORES, ValueError, "labels must contain only 0 and 1"),
        (np.array([0, 1, 0.5, 1]), GOOD_SCORES, ValueError, "labels must contain only 0 and 1"),
        (GOOD_LABELS, np.array([0.1, np.nan, 0.3, 0.2]), ValueError, "scores contains NaN"),
        (GOOD_LABELS, np.array([0.1, np.inf, 0.3, 0.2]), ValueError, "scores contains infinite"),
        (GOOD_LABELS, np.array([True, False, True, True]), TypeError, "scores must hold real numbers"),
        (GOOD_LABELS, GOOD_SCORES + 1j, TypeError, "scores must hold real numbers"),
        (GOOD_LABELS, np.array(["a", "b", "c", "d"]), TypeError, "scores must hold real numbers"),
        (np.array(["0", "1", "0", "1"]), GOOD_SCORES, TypeError, "labels must be boolean or 0/1"),
    ],
)
def test_image_metrics_reject_bad_input(function, labels, scores, error, match):
    with pytest.raises(error, match=match):
        function(labels, scores)


def test_nan_in_torch_scores_is_named():
    with pytest.raises(ValueError, match="scores contains NaN"):
        metrics.image_auroc(torch.tensor([0, 1]), torch.tensor([0.5, float("nan")]))


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], []], ids=["only-normal", "only-anomalous", "empty"])
def test_auroc_and_roc_need_both_classes(labels):
    scores = np.arange(len(labels), dtype=float)
    with pytest.raises(ValueError, match="AUROC is undefined"):
        metrics.image_auroc(labels, scores)
    with pytest.raises(ValueError, match="ROC curve is undefined"):
        metrics.roc_curve(labels, scores)


def test_best_f1_needs_a_positive():
    with pytest.raises(ValueError, match="F1 is undefined"):
        metrics.best_f1([0, 0], [0.3, 0.4])


def _masks_maps():
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[0, 1:3, 1:3] = True
    return masks, np.random.default_rng(0).random((2, 5, 5))


@pytest.mark.parametrize("function", [metrics.pixel_auroc, metrics.aupro], ids=lambda f: f.__name__)
def test_pixel_metrics_reject_bad_input(function):
    masks, maps = _masks_maps()
    with pytest.raises(ValueError, match="masks must be 3-D"):
        function(masks[0], maps[0])
    with pytest.raises(ValueError, match="same shape"):
        function(masks, maps[:, :4])
    with pytest.raises(ValueError, match="masks must contain only 0 and 1"):
        function(masks * 0.5, maps)
    nan_maps = maps.copy()
    nan_maps[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="maps contains NaN"):
        function(masks, nan_maps)
    with pytest.raises(ValueError, match="undefined"):
        function(np.zeros_like(masks), maps)  # no defect
    with pytest.raises(ValueError, match="undefined"):
        function(np.ones_like(masks), maps)  # no normal pixel


def test_aupro_error_messages_and_limit():
    masks, maps = _masks_maps()
    with pytest.raises(ValueError, match="no defect region"):
        metrics.aupro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="no normal pixel"):
        metrics.aupro(np.ones_like(masks), maps)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fpr_limit must be in"):
            metrics.aupro(masks, maps, bad)
    for bad in ("0.3", True, None):
        with pytest.raises(TypeError, match="fpr_limit must be a number"):
            metrics.aupro(masks, maps, bad)

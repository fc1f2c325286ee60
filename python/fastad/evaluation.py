"""Evaluating a fitted model on a labelled test set: metrics, speed, and what the report shows.

Any ``fastad.estimator.Estimator`` is evaluated the same way: a method fitted on normal images on
a data set of images, a ``SiameseDetector`` on a data set of template / inspected pairs
(``fastad.data.ChangePairs``); the model scores groups of items (``_predict_items``)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import metrics
from ._batching import group_by_size, iterate
from .estimator import Estimator


@dataclass
class EvaluationResult:
    """Per-image results of one test set and the metrics computed from them.

    ``images`` (N, 3, H, W), ``maps`` (None for an image-level method) and ``masks`` (N, H, W) are kept
    for the report; ``labels`` (N,) 0/1, ``scores`` (N,), ``defects`` and ``paths`` lists of N strings.
    """

    metrics: dict[str, Any]
    per_defect: dict[str, dict[str, Any]]
    images: torch.Tensor
    maps: torch.Tensor | None
    masks: torch.Tensor
    has_mask: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    defects: list[str]
    paths: list[str]
    threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _collect(model: Estimator, dataset, timing_items: int) -> dict[str, Any]:
    """Predicts every item of ``dataset`` (after the model's transform), batching consecutive
    items of one size; keeps the first ``timing_items`` items for timing."""
    out: dict[str, list] = {
        k: [] for k in ("images", "maps", "scores", "masks", "has_mask", "labels", "defects", "paths", "timing")
    }
    for group in group_by_size(iterate(model._prepared(dataset)), model.batch_size):
        images, pred = model._predict_items(group)
        out["timing"].extend(group[: timing_items - len(out["timing"])])
        out["images"].append(images)
        out["scores"].append(pred.scores)
        if pred.maps is not None:
            out["maps"].append(pred.maps)
        for item in group:
            out["masks"].append(torch.as_tensor(item["mask"], dtype=torch.bool))
            out["has_mask"].append(bool(item["has_mask"]))
            out["labels"].append(int(item["label"]))
            out["defects"].append(str(item["defect"]))
            out["paths"].append(str(item["path"]))
    shapes = {tuple(m.shape[-2:]) for m in out["images"]}
    if len(shapes) > 1:
        raise ValueError(
            f"the test images have {len(shapes)} different sizes ({sorted(shapes)[:3]}...); "
            "evaluate them with a transform that resizes them to one size (the method's transform())"
        )
    return out


def _time_latency(model: Estimator, items: list[dict[str, Any]], repeats: int) -> float:
    """Median wall time of scoring one item, in milliseconds (after one warm-up call)."""
    model._predict_items(items[:1])
    times = []
    for i in range(min(repeats, len(items))):
        one = items[i : i + 1]
        if str(model.device).startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model._predict_items(one)
        if str(model.device).startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _time_throughput(model: Estimator, items: list[dict[str, Any]], batch: int, repeats: int = 3) -> float:
    """Items per second of scoring one batch of ``batch`` items (repeating the test items when
    there are fewer): the median of ``repeats`` timed calls after one warm-up call at that batch
    size (the first call at a new size builds the convolution primitives)."""
    block = (items * -(-batch // len(items)))[:batch]
    saved = model.batch_size
    model.batch_size = batch
    try:
        model._predict_items(block)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model._predict_items(block)
            if str(model.device).startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return batch / statistics.median(times)
    finally:
        model.batch_size = saved


def evaluate(model: Estimator, dataset, *, latency_images: int = 10, throughput_batch: int = 32) -> EvaluationResult:
    """Scores every item of a labelled data set (items as ``fastad.data`` gives them) and computes
    image AUROC, pixel AUROC and AUPRO (over images with masks), the best F1 and its threshold,
    the model's own threshold, latency at batch 1 and throughput at ``throughput_batch``.
    """
    if len(dataset) == 0:
        raise ValueError("the test set is empty")
    c = _collect(model, dataset, max(latency_images, throughput_batch))
    images = torch.cat(c["images"])
    maps = torch.cat(c["maps"]) if c["maps"] else None  # None: the method scores whole images only
    scores = torch.cat(c["scores"])
    masks = torch.stack(c["masks"])
    has_mask = torch.tensor(c["has_mask"])
    labels = torch.tensor(c["labels"])
    if maps is not None and masks.shape != maps.shape:
        raise ValueError(f"masks of shape {tuple(masks.shape[1:])} do not match maps of shape {tuple(maps.shape[1:])}")

    both_classes = bool((labels == 0).any() and (labels == 1).any())
    m: dict[str, Any] = {"n_images": int(labels.numel()), "n_anomalous": int(labels.sum())}
    m["image_auroc"] = metrics.image_auroc(labels, scores) if both_classes else None
    pix = has_mask.nonzero().flatten()
    pixel_ok = maps is not None and pix.numel() > 0 and bool(masks[pix].any()) and bool((~masks[pix]).any())
    m["pixel_auroc"] = metrics.pixel_auroc(masks[pix], maps[pix]) if pixel_ok else None
    m["aupro"] = metrics.aupro(masks[pix], maps[pix]) if pixel_ok else None
    if both_classes:
        m["f1_max"], m["f1_threshold"] = metrics.best_f1(labels, scores)
    else:
        m["f1_max"], m["f1_threshold"] = None, None
    threshold = getattr(model, "threshold_", None)
    m["threshold"] = threshold
    if threshold is not None:
        predicted = scores > threshold
        tp = int((predicted & (labels == 1)).sum())
        m["precision_at_threshold"] = tp / max(int(predicted.sum()), 1)
        m["recall_at_threshold"] = tp / max(int((labels == 1).sum()), 1)
    m["latency_ms"] = _time_latency(model, c["timing"], latency_images)
    m["throughput_img_s"] = _time_throughput(model, c["timing"], throughput_batch)
    m["device"] = str(model.device)

    per_defect: dict[str, dict[str, Any]] = {}
    good = labels == 0
    for defect in sorted(set(c["defects"]) - {"good"}):
        sel = torch.tensor([d == defect for d in c["defects"]])
        entry: dict[str, Any] = {"n_images": int(sel.sum())}
        entry["image_auroc"] = metrics.image_auroc(labels[sel | good], scores[sel | good]) if bool(good.any()) else None
        pix_d = (sel | good) & has_mask
        ok = maps is not None and bool(pix_d.any()) and bool(masks[pix_d].any())
        entry["pixel_auroc"] = metrics.pixel_auroc(masks[pix_d], maps[pix_d]) if ok else None
        per_defect[defect] = entry

    return EvaluationResult(
        metrics=m,
        per_defect=per_defect,
        images=images,
        maps=maps,
        masks=masks,
        has_mask=has_mask,
        labels=labels,
        scores=scores,
        defects=c["defects"],
        paths=c["paths"],
        threshold=threshold,
    )

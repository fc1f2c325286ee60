"""Experiment 4, high-resolution aerial images: synthetic rectangles on a large template, then the
real LEVIR-CD / DSIFN-CD before / after pairs against their change masks."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from fastad import metrics
from fastad.data import load_image, load_mask
from fastad.viz import save_figure

from .cifar import require_detector
from .common import Run, Skip, as_bool_array, mean_of, panel_row, pooled_pixel_auroc, rgb, stream_generator
from .config import (
    AERIAL_HEIGHT,
    AERIAL_RECTANGLE_SIZE,
    AERIAL_RECTANGLES,
    AERIAL_WIDTH,
    CHANGE_SETS,
    STREAM_AERIAL,
    TRANSFER_NOTE,
)
from .mosaic import four_panel_figure
from .scenes import aerial_template, scatter_rectangles


def _change_sets(run: Run) -> dict[str, Path]:
    root = run.data_root / "change_detection"
    return {name: root / name for name in CHANGE_SETS if (root / name / "A").is_dir()}


def aerial(run: Run) -> dict[str, Any]:
    sets = _change_sets(run)
    if not sets:
        raise Skip(
            f"no change-detection images: {run.data_root / 'change_detection'}/{{{','.join(CHANGE_SETS)}}}/A is missing"
        )
    detector = require_detector(run, "the aerial experiment")
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


def _aerial_synthetic(run: Run, detector, sets: dict[str, Path]) -> dict[str, Any]:

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
    generator = stream_generator(run.config.seed, STREAM_AERIAL)
    template = aerial_template(images, height=AERIAL_HEIGHT, width=AERIAL_WIDTH)
    inspected, mask = scatter_rectangles(template, generator, count=AERIAL_RECTANGLES, size=AERIAL_RECTANGLE_SIZE)
    mask = as_bool_array(mask)
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
    figure = four_panel_figure(
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


def _change_detection(run: Run, detector, sets: dict[str, Path]) -> tuple[dict[str, Any], str]:

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
        pooled = pooled_pixel_auroc(masks, maps) if both_classes else None
        results[name] = {
            "pooled_pixel_auroc": pooled,
            "mean_pair_pixel_auroc": mean_of(list(per_pair.values())),
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

    rows = max(len(shown), 1)
    fig = Figure(figsize=(4 * 3.4, 3.4 * rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, 4, squeeze=False))
    for row, (name, before, after, amap, label) in zip(axes, shown, strict=False):
        # Each map on its own colour scale, stated in its title: on real changes the scores of a
        # network trained on rectangles stay low, and a shared 0-1 scale would show nothing.
        top = max(float(np.max(amap)), 1e-6)
        panel_row(
            row,
            [
                (f"{name}: A (before)", rgb(before), {}),
                ("B (after)", rgb(after), {}),
                (f"anomaly map (colours 0 to {top:.3g})", amap, {"cmap": "jet", "vmin": 0.0, "vmax": top}),
                ("change label", label, {"cmap": "gray", "vmin": 0, "vmax": 1}),
            ],
        )
    fig.suptitle("Real before / after pairs (the network saw only synthetic rectangles in training)", fontsize=10)
    return save_figure(fig, path)

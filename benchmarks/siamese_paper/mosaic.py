"""Experiment 3: mosaics of CIFAR-10 images with rectangles in half of the cells."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from fastad import metrics
from fastad.checks import check_int
from fastad.viz import save_figure

from .cifar import require_detector
from .common import (
    Run,
    Skip,
    as_bool_array,
    cell_scores,
    map_options,
    mean_of,
    net_device,
    panel_row,
    rgb,
    stream_generator,
)
from .config import MOSAIC_GRID, STREAM_MOSAIC
from .scenes import mosaic_pair


def mosaic(run: Run) -> dict[str, Any]:
    c = run.config
    # The paper builds its mosaic from CIFAR-10 training images (mosaic_images="test": unseen ones).
    # Reading them skips first when CIFAR-10 is missing: the data reason is the clearer one.
    test = run.cifar_train() if c.mosaic_images == "train" else run.cifar_test()
    detector = require_detector(run, "the mosaic experiment")

    cells = MOSAIC_GRID * MOSAIC_GRID
    if len(test) < cells:
        raise Skip(
            f"a {MOSAIC_GRID}x{MOSAIC_GRID} mosaic needs {cells} {c.mosaic_images} images, only {len(test)} were read"
        )
    generator = stream_generator(c.seed, STREAM_MOSAIC)
    aurocs: dict[str, list[float]] = {"cell": [], "aligned_cell": [], "pixel": []}
    figure = None
    for m in range(c.mosaics):
        pick = torch.randperm(len(test), generator=generator)[:cells]
        pair = mosaic_pair(test.images[pick], generator, grid=MOSAIC_GRID, defect_fraction=0.5)
        template, inspected = pair["template"], pair["inspected"]
        mask, labels = as_bool_array(pair["mask"]), as_bool_array(pair["cell_labels"])
        detection = detector.detect(template, inspected)
        full = detection.full_resolution()
        aurocs["cell"].append(metrics.image_auroc(labels.ravel(), cell_scores(full, labels.shape).ravel()))
        if detector.network_.window * MOSAIC_GRID == template.shape[-1]:  # a model of another window has none
            aligned = aligned_cell_scores(detector.network_, template, inspected, MOSAIC_GRID)
            aurocs["aligned_cell"].append(metrics.image_auroc(labels.ravel(), aligned.ravel()))
        aurocs["pixel"].append(metrics.pixel_auroc(mask[None], full[None]))
        aligned_text = f" (aligned windows {aurocs['aligned_cell'][-1]:.3f})" if aurocs["aligned_cell"] else ""
        run.log(
            f"[mosaic] mosaic {m + 1}/{c.mosaics}: cell AUROC {aurocs['cell'][-1]:.4f}{aligned_text}, "
            f"pixel AUROC {aurocs['pixel'][-1]:.4f}"
        )
        if m == 0:
            figure = four_panel_figure(
                run.out_dir / "mosaic.png",
                template,
                inspected,
                full,
                mask,
                f"mosaic 1: cell AUROC {aurocs['cell'][0]:.3f}{aligned_text}, pixel AUROC {aurocs['pixel'][0]:.3f}",
            )
    return {
        "cell_auroc_mean": mean_of(aurocs["cell"]),
        "aligned_cell_auroc_mean": mean_of(aurocs["aligned_cell"]),
        "pixel_auroc_mean": mean_of(aurocs["pixel"]),
        "cell_auroc": aurocs["cell"],
        "aligned_cell_auroc": aurocs["aligned_cell"],
        "pixel_auroc": aurocs["pixel"],
        "mosaics": c.mosaics,
        "grid": MOSAIC_GRID,
        "defect_fraction": 0.5,
        "map_step": detection.step,
        "definitions": {
            "cell_auroc": (
                "cell score = maximum of the full-resolution (bilinear) map inside the cell; label = the "
                "cell got a rectangle. Windows centred near a cell's border also see its neighbour, so a "
                "rectangle raises the maximum of the cells next to it too"
            ),
            "aligned_cell_auroc": (
                "cell score = the network's score for exactly the cell's own 32 x 32 template / "
                "inspected windows (the input it was trained on), from the unpadded sliding map"
            ),
            "pixel_auroc": "the full-resolution map against the rectangles' pixel mask",
        },
        "figures": [figure],
    }


def aligned_cell_scores(net, template: Tensor, inspected: Tensor, grid: int) -> np.ndarray:
    """The network's anomaly score of each cell's own window pair, float64 (grid, grid).

    ``template``, ``inspected``: (C, H, W) in [0, 1] whose ``grid`` x ``grid`` cells are each one
    ``net.window`` square (a mosaic of training-size images). On the unpadded pair, output
    position k of the encoder starts at input pixel ``stride * k`` (see :mod:`.network`), so cell
    (r, c) is output position (r, c) * window / stride: one network pass gives every cell.
    """
    check_int(grid, "grid")
    size = grid * net.window
    if tuple(template.shape[-2:]) != (size, size) or template.shape != inspected.shape:
        raise ValueError(
            f"template and inspected must both be (C, {size}, {size}) for a {grid}x{grid} grid of "
            f"{net.window}-pixel cells, got {tuple(template.shape)} and {tuple(inspected.shape)}"
        )
    step = net.window // net.stride  # the window is a multiple of the stride (NetworkConfig checks it)
    device = net_device(net)
    with torch.inference_mode():
        scores = net.anomaly(template[None].to(device), inspected[None].to(device))[0]
    return scores[::step, ::step].double().cpu().numpy()


def four_panel_figure(
    path: Path, template: Tensor, inspected: Tensor, amap: np.ndarray, mask: np.ndarray, title: str, dpi: int = 100
) -> str:

    h, w = amap.shape
    fig = Figure(figsize=(4 * 4.2, 4.2 * h / w + 0.6), layout="constrained")
    axes = fig.subplots(1, 4)
    panel_row(
        axes,
        [
            ("template", rgb(template), {}),
            ("inspected", rgb(inspected), {}),
            ("anomaly map (1 - P(similar))", amap, map_options(amap)),
            ("ground truth", mask, {"cmap": "gray", "vmin": 0, "vmax": 1}),
        ],
    )
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi)

"""The self-contained HTML report of an evaluation: metrics, ROC curves, best and worst cases.

Every picture is embedded as a base64 PNG, so ``report.html`` is one file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics, viz
from .evaluation import EvaluationResult
from .io import atomic_path

_CASES = 4  # images per group in the best/worst grids


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _roc_figure(result: EvaluationResult) -> bytes | None:
    from matplotlib.figure import Figure  # a bare Figure: no pyplot, no global backend change

    labels, scores = result.labels, result.scores
    if not ((labels == 0).any() and (labels == 1).any()):
        return None
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    ax.plot(fpr, tpr, lw=2, label=f"all ({result.metrics['image_auroc']:.3f})")
    good = labels == 0
    for defect, entry in result.per_defect.items():  # AUROCs as evaluate() computed them
        sel = torch.tensor([d == defect for d in result.defects]) | good
        f, t, _ = metrics.roc_curve(labels[sel], scores[sel])
        ax.plot(f, t, lw=1, label=f"{defect} ({entry['image_auroc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Image-level ROC (AUROC)")
    ax.legend(fontsize=8, loc="lower right")
    return _figure_png(fig)


def _histogram_figure(result: EvaluationResult) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    s = result.scores.numpy()
    bins = np.linspace(float(s.min()), float(s.max()) + 1e-12, 30)
    for label, name in ((0, "good"), (1, "anomalous")):
        sel = (result.labels == label).numpy()
        if sel.any():
            ax.hist(s[sel], bins=bins, alpha=0.6, label=name)
    if result.threshold is not None:
        ax.axvline(result.threshold, color="k", ls="--", lw=1, label="threshold")
    ax.set_xlabel("image score")
    ax.legend(fontsize=8)
    return _figure_png(fig)


def _cases(result: EvaluationResult) -> list[tuple[str, list[int]]]:
    """Index groups for the grids: missed anomalies, false alarms, clearest hits, quietest goods."""
    order = torch.argsort(result.scores)
    anomalous = [int(i) for i in order if result.labels[i] == 1]
    good = [int(i) for i in order if result.labels[i] == 0]
    return [
        ("Worst: anomalous images with the lowest scores", anomalous[:_CASES]),
        ("Worst: good images with the highest scores", good[::-1][:_CASES]),
        ("Best: anomalous images with the highest scores", anomalous[::-1][:_CASES]),
        ("Best: good images with the lowest scores", good[:_CASES]),
    ]


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def _table(rows: list[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows) + "</table>"


def write_report(
    result: EvaluationResult,
    out_dir: str | Path,
    *,
    title: str = "fastad evaluation",
    model_info: dict[str, Any] | None = None,
) -> Path:
    """Writes ``report.html`` into ``out_dir`` (created if needed) and returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    has_maps = result.maps is not None
    vmin, vmax = (float(result.maps.min()), float(result.maps.max())) if has_maps else (0.0, 1.0)

    parts = [f"<h1>{html.escape(title)}</h1>"]
    if model_info:
        parts.append(
            "<h2>Model</h2>"
            + _table([(k, json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in model_info.items()])
        )
    parts.append("<h2>Metrics</h2>" + _table(list(result.metrics.items())))
    if result.per_defect:
        head = "<tr><th>defect</th><th>images</th><th>image AUROC</th><th>pixel AUROC</th></tr>"
        rows = "".join(
            f"<tr><td>{html.escape(d)}</td><td>{e['n_images']}</td><td>{_fmt(e['image_auroc'])}</td>"
            f"<td>{_fmt(e['pixel_auroc'])}</td></tr>"
            for d, e in result.per_defect.items()
        )
        parts.append(f"<h2>Per defect type</h2><table>{head}{rows}</table>")
    roc = _roc_figure(result)
    figs = ([roc] if roc else []) + [_histogram_figure(result)]
    parts.append("<div>" + "".join(f'<img class="fig" src="{_data_uri(p)}" alt="figure">' for p in figs) + "</div>")

    parts.append(
        "<h2>Cases</h2><p>"
        + (
            f"Heat maps share one colour scale, from {vmin:.4g} to {vmax:.4g}."
            if has_maps
            else "This method scores whole images; it makes no anomaly maps."
        )
        + "</p>"
    )
    for caption, indices in _cases(result):
        if not indices:
            continue
        cells = []
        for i in indices:
            gt = viz.mask_to_rgb(result.masks[i]) if bool(result.has_mask[i]) else None
            pics = [
                ("image", viz.image_to_rgb(result.images[i])),
                ("ground truth" if gt is not None else "no mask", gt),
                (
                    "heat map" if has_maps else "no map",
                    viz.overlay(result.images[i], result.maps[i], vmin=vmin, vmax=vmax) if has_maps else None,
                ),
            ]
            imgs = "".join(
                (
                    f'<figure><img src="{_data_uri(viz.png_bytes(p))}" alt="{name}">'
                    f"<figcaption>{name}</figcaption></figure>"
                )
                if p is not None
                else f"<figure><div class='empty'>{name}</div><figcaption>{name}</figcaption></figure>"
                for name, p in pics
            )
            label = "anomalous" if int(result.labels[i]) else "good"
            cells.append(
                f"<div class='case'><p>{html.escape(Path(result.paths[i]).name)} &middot; "
                f"{html.escape(result.defects[i])} ({label}) &middot; score {float(result.scores[i]):.4g}</p>"
                f"{imgs}</div>"
            )
        parts.append(f"<h3>{html.escape(caption)}</h3>" + "".join(cells))

    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}img.fig{margin:0 1em 1em 0}"
        ".case{display:inline-block;margin:0 1em 1em 0;vertical-align:top}.case p{font-size:80%;margin:0}"
        "figure{display:inline-block;margin:2px}figure img{width:160px}figcaption{font-size:70%;text-align:center}"
        ".empty{width:160px;height:160px;background:#eee}"
    )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = out_dir / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path

"""Accuracy and speed of fastad's methods on a data set in MVTec layout, with EfficientNet-Lite0.

    python -m benchmarks.accuracy [--data ../shared/data/magnetic_tile]
                                  [--methods patchcore spade padim gaussian_ad mlfsc]
                                  [--set key=value ...] [--json OUT]

For each method: fit on ``train/good`` (all of it: ``holdout=0``, as the papers do), evaluate on
``test`` with ``fastad.evaluation.evaluate`` (image AUROC, pixel AUROC, AUPRO, F1-max, latency at
batch 1, throughput at batch 32), and print one table row. The figures in RESULTS.md come from it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fastad
from fastad.cli_args import parse_sets
from fastad.data import open_dataset
from fastad.evaluation import evaluate

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


def run_method(name: str, data: Path, params: dict) -> dict:
    model = fastad.get_method(name)(**{"backbone": "efficientnet_lite0", "holdout": 0, **params})
    train, test = open_dataset(data, "train"), open_dataset(data, "test")
    start = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate(model, test)
    eval_s = time.perf_counter() - start
    m = result.metrics
    return {
        "method": name,
        "fit_s": fit_s,
        "eval_s": eval_s,
        "n_train": len(train),
        **{
            k: m[k]
            for k in ("n_images", "image_auroc", "pixel_auroc", "aupro", "f1_max", "latency_ms", "throughput_img_s")
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--methods", nargs="+", default=["patchcore", "spade", "padim", "gaussian_ad", "mlfsc"])
    parser.add_argument("--set", action="append", default=[], help="key=value parameters for every method")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"skipped: no data set at {args.data} (see ../shared/data/README.md)")
    params = parse_sets(args.set)
    print(
        f"data {args.data}, backbone efficientnet_lite0, {torch.get_num_threads()} threads, "
        f"params {params or 'defaults'}"
    )
    print(
        f"{'method':10s} {'img AUROC':>9s} {'px AUROC':>9s} {'AUPRO':>7s} {'F1max':>6s} "
        f"{'fit s':>7s} {'b1 ms':>8s} {'b32 img/s':>9s}"
    )
    rows = []
    for name in args.methods:
        r = run_method(name, args.data, params)
        rows.append(r)
        pixel = "-" if r["pixel_auroc"] is None else f"{r['pixel_auroc']:.4f}"  # image-level methods have no maps
        aupro = "-" if r["aupro"] is None else f"{r['aupro']:.4f}"
        print(
            f"{name:10s} {r['image_auroc']:9.4f} {pixel:>9s} {aupro:>7s} {r['f1_max']:6.3f} "
            f"{r['fit_s']:7.1f} {r['latency_ms']:8.1f} {r['throughput_img_s']:9.2f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""A large georeferenced scene scored end to end through the CLI, in bounded memory.

    python -m benchmarks.highres_large [--size 20000] [--tile 1024] [--method patchcore|spade|mlfsc]
                                       [--set KEY=VALUE ...] [--folder DIR] [--keep]

Generates (never committed) a size x size RGB GeoTIFF (tiled, DEFLATE, BigTIFF when needed, UTM
georeference): a smooth random surface with fine grain and 12 planted defects (dark scratches and
bright spots of 6-48 px), written window by window. PatchCore, SPADE or MLF-SC (EfficientNet-Lite0, native
resolution: no resize, no crop) is fitted on eight defect-free 384-px crops of the same surface,
then ``fastad predict --tile`` scores the scene in a separate process, whose peak resident memory
is measured (``getrusage`` of the child). Reports the time, the throughput in megapixels per
second, the peak memory, whether the map GeoTIFF carries the scene's CRS and transform, and how
many defects stand above the map's background. ``--set`` passes a parameter to the method (e.g.
``embedding=concatenated`` for PatchCore's earlier default). Files are removed afterwards unless --keep
(``make demo-highres`` keeps a 4,000-px run in build/highres-demo). In the quick-look the eight
training crops' areas read darker than the rest: the bank holds their very colours.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastad.cli_args import parse_sets

CRS = "EPSG:32633"


def surface(y0: int, y1: int, x0: int, x1: int, size: int, seed: int, cell: int = 24) -> np.ndarray:
    """Rows y0..y1, columns x0..x1 of a (3, size, size) uint8 surface that is the same whichever
    window is asked for: a coarse grid of random colours (from ``seed``) interpolated bilinearly,
    plus grain drawn per window from its position."""
    grid = np.random.default_rng(seed).random((3, size // cell + 2, size // cell + 2), dtype=np.float32)
    # One grid cell of margin above and left: the interpolation clamps at the edges of the part it
    # is given, which must therefore be the scene's own edges, not the window's (else seams).
    c0, c1 = max(0, y0 // cell - 1), (y1 - 1) // cell + 2
    d0, d1 = max(0, x0 // cell - 1), (x1 - 1) // cell + 2
    part = torch.from_numpy(grid[None, :, c0 : c1 + 1, d0 : d1 + 1].copy())
    smooth = torch.nn.functional.interpolate(part, scale_factor=cell, mode="bilinear", align_corners=False)[0]
    block = smooth[:, y0 - c0 * cell : y1 - c0 * cell, x0 - d0 * cell : x1 - d0 * cell].numpy()
    grain = np.random.default_rng([seed, y0, x0]).random(block.shape, dtype=np.float32)
    return (255 * (0.25 + 0.45 * block + 0.1 * grain)).clip(0, 255).astype(np.uint8)


def defects(size: int, seed: int, count: int = 12) -> list[tuple[int, int, int, int, int]]:
    """(top, left, height, width, value) boxes: thin dark scratches and bright spots."""
    rng = np.random.default_rng(seed + 1)
    boxes = []
    for i in range(count):
        h, w = (3, int(rng.integers(20, 49))) if i % 2 else (int(rng.integers(6, 17)), int(rng.integers(6, 17)))
        top, left = int(rng.integers(64, size - 64 - h)), int(rng.integers(64, size - 64 - w))
        boxes.append((top, left, h, w, 20 if i % 2 else 250))
    return boxes


def write_scene(path: Path, size: int, seed: int, rows: int = 512) -> list[tuple[int, int, int, int, int]]:
    import rasterio
    from affine import Affine

    boxes = defects(size, seed)
    profile = dict(
        driver="GTiff",
        height=size,
        width=size,
        count=3,
        dtype="uint8",
        crs=CRS,
        transform=Affine(0.3, 0.0, 400000.0, 0.0, -0.3, 4900000.0),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        BIGTIFF="IF_SAFER",
    )
    with rasterio.open(path, "w", **profile) as ds:
        for y in range(0, size, rows):
            y1 = min(size, y + rows)
            block = surface(y, y1, 0, size, size, seed)
            for top, left, h, w, value in boxes:
                if top < y1 and top + h > y:
                    block[:, max(top, y) - y : min(top + h, y1) - y, left : left + w] = value
            ds.write(block, window=rasterio.windows.Window(0, y, size, y1 - y))
    return boxes


def fit_model(path: Path, size: int, seed: int, method: str = "patchcore", params: dict | None = None) -> None:
    import fastad

    crops = []
    rng = np.random.default_rng(seed + 2)
    for _ in range(8):  # defect-free crops of the same surface (the defects are drawn on the scene only)
        y, x = (int(v) // 32 * 32 for v in rng.integers(0, size - 384, size=2))
        crops.append(torch.from_numpy(surface(y, y + 384, x, x + 384, size, seed).astype(np.float32) / 255))
    settings = {"backbone": "efficientnet_lite0", "resize": None, "crop": None, "holdout": 0, **(params or {})}
    model = fastad.get_method(method)(**settings)
    model.fit(torch.stack(crops)).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--method", default="patchcore", choices=["patchcore", "spade", "mlfsc"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a parameter of the method")
    parser.add_argument("--folder", type=Path, help="where to write (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the scene, model and outputs")
    args = parser.parse_args(argv)
    params = parse_sets(args.set)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="fastad-highres-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        boxes = write_scene(folder / "scene.tif", args.size, args.seed)
        print(
            f"scene {args.size} x {args.size} written in {time.perf_counter() - start:.0f} s "
            f"({(folder / 'scene.tif').stat().st_size / 1e9:.2f} GB)",
            flush=True,
        )
        fit_model(folder / "model.safetensors", args.size, args.seed, args.method, params)
        out = folder / "out"
        command = [
            sys.executable,
            "-m",
            "fastad",
            "predict",
            "--model",
            str(folder / "model.safetensors"),
            "--out",
            str(out),
            "--tile",
            str(args.tile),
            str(folder / "scene.tif"),
        ]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        elapsed = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB
        report(folder, out, boxes, args, elapsed, peak_mb)
    finally:
        if not args.keep and args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


def report(folder: Path, out: Path, boxes, args, elapsed: float, peak_mb: float) -> None:
    import rasterio

    scores = json.loads((out / "scores.json").read_text())["images"][0]
    with rasterio.open(folder / "scene.tif") as scene, rasterio.open(out / scores["map"]) as amap:
        georeferenced = amap.crs == scene.crs and amap.transform == scene.transform
        peaks = []
        for top, left, h, w, _ in boxes:
            window = rasterio.windows.Window(left - 16, top - 16, w + 32, h + 32)
            peaks.append(float(np.nanmax(amap.read(1, window=window))))
        # The background: 64 windows of 256 px away from every defect.
        rng = np.random.default_rng(7)
        background = []
        while len(background) < 64:
            y, x = (int(v) for v in rng.integers(0, args.size - 256, size=2))
            if all(abs(y + 128 - t - h / 2) > 300 or abs(x + 128 - left - w / 2) > 300 for t, left, h, w, _ in boxes):
                background.append(float(np.nanmax(amap.read(1, window=rasterio.windows.Window(x, y, 256, 256)))))
    found = sum(p > max(background) for p in peaks)
    megapixels = args.size * args.size / 1e6
    print(
        json.dumps(
            {
                "method": args.method,
                "settings": parse_sets(args.set),
                "size": args.size,
                "tile": args.tile,
                "threads": torch.get_num_threads(),
                "seconds": round(elapsed, 1),
                "megapixels_per_second": round(megapixels / elapsed, 3),
                "peak_rss_mb": round(peak_mb),
                "map_georeferenced": georeferenced,
                "defects_above_background": f"{found} of {len(boxes)}",
                "image_score": scores["score"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""A template / inspected pair far larger than one tile, run through the exact tiled inference.

    python -m benchmarks.siamese_large [--size 20000] [--tile 512] [--dense 1] [--folder DIR]

Writes two size x size RGB uint8 .npy files (a smooth random colour field, the same in both, with
20 blue rectangles of 8-40 px in the inspected one; 1.2 GB each at the default size) from a
separate process, maps the anomaly map to a .npy on disk, and reports the time, the throughput in
input megapixels per second, the process's peak resident memory (only the detection runs in it:
the images are read tile by tile and the map is written straight to the file) and whether the
rectangles were found. The files are removed afterwards unless --keep is given.

The content is smooth rather than white noise on purpose: the shipped network was trained on
CIFAR-10 photographs and does not respond on per-pixel uniform noise, which it never saw.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fastad.siamese import SiameseDetector


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_pair(folder: Path, size: int, seed: int = 0, rows_per_block: int = 1024) -> tuple[Path, Path]:
    """Two (size, size, 3) uint8 .npy files written block by block (never whole in memory)."""
    rng = np.random.default_rng(seed)
    paths = folder / "template.npy", folder / "inspected.npy"
    files = [np.lib.format.open_memmap(p, mode="w+", dtype=np.uint8, shape=(size, size, 3)) for p in paths]
    # A smooth random colour field: a coarse grid of random colours every `cell` pixels, linearly
    # interpolated; each block of rows interpolates the same grid, so there are no seams.
    cell = 16
    coarse = torch.from_numpy(rng.random((3, size // cell + 2, size // cell + 2), dtype=np.float32))
    for y in range(0, size, rows_per_block):
        rows = min(rows_per_block, size - y)
        c0, c1 = y // cell, (y + rows - 1) // cell + 1
        part = coarse[None, :, c0 : c1 + 1]
        smooth = torch.nn.functional.interpolate(
            part, size=(cell * (c1 - c0) + 1, cell * (part.shape[-1] - 1) + 1), mode="bilinear", align_corners=True
        )
        block = smooth[0, :, y - cell * c0 : y - cell * c0 + rows, :size]
        block = (block * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
        for f in files:
            f[y : y + rows] = block
    boxes = []
    for _ in range(20):  # blue rectangles of 8..40 px in the inspected image
        h, w = (int(v) for v in rng.integers(8, 41, size=2))
        top, left = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
        files[1][top : top + h, left : left + w] = (0, 0, 255)
        boxes.append((top, left, h, w))
    for f in files:
        f.flush()
    del files
    np.save(folder / "boxes.npy", np.array(boxes, dtype=np.int64))
    return paths


def _rectangles_found(cells: np.ndarray, folder: Path, step: int) -> tuple[int, float]:
    """(rectangles whose centre cell scores above 0.5, the highest score away from all of them)."""
    boxes = np.load(folder / "boxes.npy")
    found = 0
    away = np.ones(cells.shape, dtype=bool)
    for top, left, h, w in boxes:
        found += bool(cells[(top + h // 2) // step, (left + w // 2) // step] > 0.5)
        margin = 32 // step  # cells whose windows can reach the rectangle
        away[
            max(0, top // step - margin) : (top + h) // step + margin + 1,
            max(0, left // step - margin) : (left + w) // step + margin + 1,
        ] = False
    return found, float(np.max(cells[away])) if away.any() else float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--dense", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--folder", help="where to write the files (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="fastad_siamese_large_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        # Written by another process, so that the pages it touches do not count in this one's peak.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            template, inspected = pool.submit(write_pair, folder, args.size).result()
        print(f"wrote two {args.size}x{args.size} RGB files in {time.perf_counter() - start:.0f} s", flush=True)
        detector = SiameseDetector.pretrained(device=args.device)
        step = 4 // args.dense
        cells = -(-args.size // step)
        out = np.lib.format.open_memmap(folder / "map.npy", mode="w+", dtype=np.float32, shape=(cells, cells))
        rss_before = _peak_rss_mb()
        start = time.perf_counter()
        detection = detector.detect(template, inspected, tile=args.tile, dense=args.dense, out=out, progress=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        result = {
            "size": args.size,
            "tile": args.tile,
            "dense": args.dense,
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
            "seconds": seconds,
            "megapixels_per_second": args.size * args.size / 1e6 / seconds,
            "peak_rss_mb_before": rss_before,
            "peak_rss_mb": _peak_rss_mb(),
            "map_shape": list(detection.cells.shape),
        }
        result["rectangles_found"], result["max_score_away_from_rectangles"] = _rectangles_found(
            np.asarray(detection.cells), folder, step
        )
        result["rectangles"] = 20
        print(result)
        return result
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True) if not args.folder else [
                (folder / n).unlink(missing_ok=True) for n in ("template.npy", "inspected.npy", "map.npy")
            ]


if __name__ == "__main__":
    main()

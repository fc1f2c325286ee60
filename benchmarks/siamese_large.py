"""A template / inspected pair far larger than one tile, run through the exact tiled inference.

    python -m benchmarks.siamese_large [--size 20000] [--tile 1024] [--dense 1] [--folder DIR]

Writes two size x size RGB uint8 .npy files (noise with a few blue rectangles in the inspected
one; 1.2 GB each at the default size), maps the anomaly map to a .npy on disk, and reports the
time, the throughput in input megapixels per second and the process's peak resident memory,
which stays at a few hundred MB whatever the size: the images are read tile by tile and the map
is written straight to the file. The files are removed afterwards unless --keep is given.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
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
    for y in range(0, size, rows_per_block):
        block = rng.integers(0, 256, size=(min(rows_per_block, size - y), size, 3), dtype=np.uint8)
        for f in files:
            f[y : y + block.shape[0]] = block
    for _ in range(20):  # blue rectangles of 8..40 px in the inspected image
        h, w = rng.integers(8, 41, size=2)
        top, left = rng.integers(0, size - h), rng.integers(0, size - w)
        files[1][top : top + h, left : left + w] = (0, 0, 255)
    for f in files:
        f.flush()
    del files
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--dense", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--folder", help="where to write the files (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="fastad_siamese_large_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        template, inspected = write_pair(folder, args.size)
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
            "size": args.size, "tile": args.tile, "dense": args.dense, "device": args.device,
            "torch_threads": torch.get_num_threads(), "seconds": seconds,
            "megapixels_per_second": args.size * args.size / 1e6 / seconds,
            "peak_rss_mb_before": rss_before, "peak_rss_mb": _peak_rss_mb(),
            "map_shape": list(detection.cells.shape), "max_score": float(np.max(detection.cells)),
        }
        print(result)
        return result
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True) if not args.folder else [
                (folder / n).unlink(missing_ok=True) for n in ("template.npy", "inspected.npy", "map.npy")]


if __name__ == "__main__":
    main()

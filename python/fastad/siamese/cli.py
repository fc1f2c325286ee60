"""``fastad siamese train | detect``: the Siamese network from the command line (its paper's
experiments: ``python -m benchmarks.siamese_paper``; evaluation on change pairs: ``fastad evaluate``).

fastad siamese train --data PATH --model OUT [--pairs rectangles|digits] [--epochs N]
                     [--pairs-per-epoch N] [--limit N] [--device D] [--curve PNG]
                     [--set key=value ...]
fastad siamese detect --template A --inspected B --out DIR [--model M] [--tile N]
                      [--dense 1|2|4] [--device D]
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

import numpy as np
import torch

from .. import viz
from ..cli_args import CliError, parse_sets
from ..data import load_image
from ..io import atomic_path, output_folder, write_json
from .detector import SiameseDetector
from .pairs import DigitPairs, RectanglePairs
from .sources import is_mnist_folder, load_image_folder, load_mnist

# Above this many input pixels, detect writes its pictures at the map's resolution (one pixel per
# cell, blocks of cells beyond PICTURE_SIDE) rather than upsampled to the input's: a 20,000 x
# 20,000 overlay would take gigabytes.
FULL_RESOLUTION_PICTURE_LIMIT = 16_000_000
PICTURE_SIDE = 4096  # beyond that the pictures show blocks of cells by their maximum


def _reduced(cells: np.ndarray, side: int) -> np.ndarray:
    """``cells`` reduced by block maximum (a defect stays visible) to at most ``side`` a side."""
    factor = -(-max(cells.shape) // side)
    if factor <= 1:
        return cells
    t = torch.from_numpy(np.ascontiguousarray(cells, dtype=np.float32))[None, None]
    return torch.nn.functional.max_pool2d(t, factor, ceil_mode=True)[0, 0].numpy()


def add_parser(sub) -> None:
    """Adds ``siamese`` and its sub-commands to the ``fastad`` parser's sub-parsers."""
    parser = sub.add_parser("siamese", help="template-vs-inspected detection with the Siamese network")
    commands = parser.add_subparsers(dest="siamese_command", required=True)

    p = commands.add_parser("train", help="train the network on pairs and write a model file")
    p.add_argument(
        "--data",
        required=True,
        help="ImageFolder folder or .zip (train/ and test/ splits, e.g. cifar10.zip) for rectangle "
        "pairs, or an MNIST folder (idx files) for digit pairs",
    )
    p.add_argument("--model", required=True, help="model file to write (.safetensors)")
    p.add_argument(
        "--pairs",
        choices=("rectangles", "digits"),
        help="pair rule: synthetic blue rectangles (default) or same digit (default for MNIST)",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--pairs-per-epoch", type=int, help="default: one pair per training image (digits: 50,000)")
    p.add_argument("--limit", type=int, help="use only this many training images (quick runs)")
    p.add_argument(
        "--heldout", type=int, default=10_000, help="held-out pairs from the test split (default 10,000; 0: none)"
    )
    p.add_argument("--device")
    p.add_argument("--curve", help="also write the learning curve (train / held-out loss per epoch) to this PNG")
    p.add_argument(
        "--checkpoint",
        help="training state file written after every epoch; the same command run again resumes from it",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other SiameseDetector parameter")
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("detect", help="anomaly map of an inspected image against its template")
    p.add_argument("--template", required=True, help="template image (PNG/JPEG/..., or .npy / TIFF for --tile)")
    p.add_argument("--inspected", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", help="model file (default: the detector shipped with fastad)")
    p.add_argument("--tile", type=int, help="tile size in pixels: exact tiled inference in bounded memory")
    p.add_argument("--dense", type=int, choices=(1, 2, 4), help="map step 4 / dense pixels (cost dense^2)")
    p.add_argument(
        "--padding",
        choices=("reflect", "replicate", "zeros"),
        help="how windows past the border see the image (default: the model's, reflect)",
    )
    p.add_argument("--device")
    p.set_defaults(run=cmd_detect)


def cmd_train(args: argparse.Namespace) -> int:
    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f"--data: no such file or folder: {data}")
    for option, value in (("--model", args.model), ("--curve", args.curve)):  # before, not after, the training
        if value is not None and (Path(value).is_dir() or not Path(value).parent.is_dir()):
            raise CliError(f"{option} {value}: not a file in an existing folder")
    kind = args.pairs or ("digits" if is_mnist_folder(data) else "rectangles")
    params = parse_sets(args.set or [])
    if kind == "digits":
        params = {"window": 28, "in_channels": 1, "embed_dim": 3, **params}  # the clustering study's 3-D embedding
    for name, value in (("epochs", args.epochs), ("device", args.device)):
        if value is not None:
            params[name] = value
    try:
        detector = SiameseDetector(**params)
    except TypeError as exc:
        raise CliError(f"--set: {exc}") from None

    start = time.perf_counter()
    if kind == "digits":
        train = load_mnist(data, "train", limit=args.limit)
        test = load_mnist(data, "test")
        pairs = DigitPairs(train.images, train.labels, args.pairs_per_epoch or 50_000, seed=detector.seed)
        heldout = DigitPairs(test.images, test.labels, args.heldout, seed=detector.seed + 1) if args.heldout else None
    else:
        train = load_image_folder(data, "train", limit=args.limit)
        test = None
        if args.heldout:
            try:
                test = load_image_folder(data, "test")
            except ValueError as exc:
                if "has no split folder 'test'" not in str(exc):
                    raise  # a damaged test split is an error, not a reason to drop the held-out loss
                print(f"note: {data} has no test/ split: training without held-out pairs")
        pairs = RectanglePairs(train.images, args.pairs_per_epoch, seed=detector.seed)
        heldout = (
            None if test is None else RectanglePairs(test.images, min(args.heldout, len(test)), seed=detector.seed + 1)
        )
    print(
        f"{len(train)} training images from {data}; {len(pairs)} {kind} pairs per epoch, "
        f"{detector.epochs} epochs on {detector.device}",
        flush=True,
    )

    def log(epoch: int, history) -> None:
        held = (
            ""
            if not history.heldout_loss
            else (f", held-out loss {history.heldout_loss[-1]:.4f}, accuracy {history.heldout_accuracy[-1]:.3f}")
        )
        print(f"epoch {epoch + 1}: train loss {history.train_loss[-1]:.4f}{held} ({history.seconds:.0f} s)", flush=True)

    info = {
        "command": "fastad " + shlex.join(args.argv),
        "data": str(data),
        "pairs": kind,
        "n_images": len(train),
        "pairs_per_epoch": len(pairs),
    }
    if args.checkpoint and Path(args.checkpoint).exists():
        print(f"resuming from checkpoint {args.checkpoint}", flush=True)
    detector.train(
        pairs, heldout, normalization_images=train.images, log=log, training_info=info, checkpoint=args.checkpoint
    )
    out = detector.save(args.model)
    print(f"trained in {time.perf_counter() - start:.0f} s; model written to {out}")
    if args.curve:
        viz.learning_curve_figure(
            Path(args.curve), detector.history_, f"Siamese network on {kind} pairs from {data.name}"
        )
        print(f"learning curve: {args.curve}")
    return 0


def _load_detector(model: str | None, device: str | None):
    return SiameseDetector.pretrained(device=device) if model is None else SiameseDetector.load(model, device=device)


def cmd_detect(args: argparse.Namespace) -> int:
    detector = _load_detector(args.model, args.device)
    if args.padding:
        detector.padding = args.padding
    out_dir = output_folder(args.out)
    start = time.perf_counter()
    detection = detector.detect(args.template, args.inspected, dense=args.dense, tile=args.tile, progress=None)
    seconds = time.perf_counter() - start
    cells = detection.cells
    with atomic_path(out_dir / "map.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(cells, dtype=np.float32))
    height, width = detection.image_size
    full = height * width <= FULL_RESOLUTION_PICTURE_LIMIT
    picture = detection.full_resolution() if full else _reduced(np.asarray(cells), PICTURE_SIDE)
    vmin, vmax = 0.0, max(1.0, float(np.max(cells)))  # scores are probabilities, except head "none"
    viz.save_map_png(out_dir / "map.png", picture, vmin=vmin, vmax=vmax)
    viz.save_png(out_dir / "map_heat.png", viz.heatmap(picture, vmin=vmin, vmax=vmax))
    files = ["map.npy", "map.png", "map_heat.png"]
    if full and Path(args.inspected).suffix.lower() not in (".npy", ".tif", ".tiff"):
        viz.save_png(out_dir / "overlay.png", viz.overlay(load_image(args.inspected), picture, vmin=vmin, vmax=vmax))
        files.append("overlay.png")
    summary = {
        "template": str(args.template),
        "inspected": str(args.inspected),
        "model": args.model or "shipped",
        "image_size": [height, width],
        "map_shape": list(cells.shape),
        "step": detection.step,
        "map_png_resolution": "input"
        if full
        else f"map, cells reduced by their maximum to at most {PICTURE_SIDE} a side",
        "map_png_range": [vmin, vmax],
        "map_png_shape": list(picture.shape),
        "max_score": float(np.max(cells)),
        "mean_score": float(np.mean(cells)),
        "seconds": seconds,
        "megapixels_per_second": height * width / 1e6 / seconds,
        "files": files,
    }
    write_json(out_dir / "detection.json", summary)
    print(
        f"{height}x{width} pair in {seconds:.2f} s ({summary['megapixels_per_second']:.2f} MP/s); "
        f"max score {summary['max_score']:.4f}; map (step {detection.step} px) in {out_dir}"
    )
    return 0

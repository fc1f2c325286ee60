"""The ``fastad`` command: fit, predict, evaluate, info.

    fastad fit --method NAME [--backbone NAME] --data DIR --model OUT [--device cpu|cuda]
               [--batch-size N] [--tile PX] [--set key=value ...]
    fastad predict --model M --out DIR [--device D] [--tile PX] [--template T] IMAGES...
    fastad evaluate --model M --data DIR --report DIR [--device D]
    fastad info
    fastad siamese train | detect ...   (see fastad.siamese.cli)

``main(argv)`` returns the exit status (0 ok, 1 a failed run, 2 a bad command line), so that it
can be called in-process as well as through the ``fastad`` script or ``python -m fastad``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import distributed, viz
from .build import build_info
from .cli_args import CliError, parse_sets
from .data import load_image, open_dataset
from .estimator import load_model
from .evaluation import evaluate
from .features import available_backbones
from .geo import MapWriter, RasterReader, gdal_cache
from .highres import fit_large, open_image, predict_large
from .io import output_folder, write_json
from .methods import available_methods, get_method
from .report import write_report
from .siamese.cli import add_parser as add_siamese_parser


def cmd_fit(args: argparse.Namespace) -> int:
    klass = get_method(args.method)
    params = parse_sets(args.set or [])
    accepted = set(klass._param_names())
    for name, value in (("backbone", args.backbone), ("device", args.device), ("batch_size", args.batch_size)):
        if value is None:
            continue
        if name not in accepted:
            raise CliError(
                f"method {args.method!r} has no parameter {name!r} (its parameters: {', '.join(sorted(accepted))})"
            )
        params[name] = value
    unknown = set(params) - accepted
    if unknown:
        raise CliError(
            f"method {args.method!r} has no parameter(s) {', '.join(sorted(unknown))}; "
            f"its parameters: {', '.join(sorted(accepted))}"
        )
    # Under torchrun every process fits on its block of the images and the results are merged;
    # rank 0 writes the model file once every rank has finished (with a bank left split across
    # the processes, --set shard_bank=true, each writes its part beside it). --device cuda gives
    # each process the GPU of its local rank.
    distributed.init_from_environment(params.get("device", "cpu"))
    if "device" in params:
        params["device"] = distributed.process_device(params["device"])
    model = klass(**params)
    dataset = open_dataset(args.data, "train")  # fit applies the method's transform()
    start = time.perf_counter()
    if args.tile is not None:  # native resolution, each image read tile by tile
        with gdal_cache():
            fit_large(model, [sample.path for sample in dataset.samples if sample.label == 0], tile=args.tile)
    else:
        model.fit(dataset)
    elapsed = time.perf_counter() - start
    distributed.barrier()
    rank, size = distributed.world()
    split = bool(model._split_state_names())
    if split or rank == 0:
        out = model.save(args.model)
    if rank == 0:
        threshold = "none" if model.threshold_ is None else f"{model.threshold_:.6g}"
        ranks = f" across {size} processes" if size > 1 else ""
        parts = f" and {size} part files beside it" if split else ""
        print(
            f"fitted {args.method} on {model.n_train_images_} images{ranks} in {elapsed:.1f} s "
            f"(threshold {threshold}); model written to {out}{parts}"
        )
    distributed.barrier()  # the file exists for every rank once this returns
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    # Under torchrun: the images are divided among the processes, or, for tiled prediction and a
    # bank split across the processes, every process takes part in every image and rank 0 writes.
    distributed.init_from_environment(args.device or "cpu")
    rank, size = distributed.world()
    model = load_model(args.model, device=distributed.process_device(args.device))
    # A Siamese detector scores each image against the template; the methods score images alone.
    pairs = model.scores_pairs
    if pairs and args.template is None:
        raise CliError(
            f"{args.model} holds a {model.method_name!r} model, which scores images against a template: give --template"
        )
    if not pairs and args.template is not None:
        raise CliError(f"--template is for a model that scores pairs; {args.model} holds a {model.method_name!r} model")
    template = load_image(args.template) if pairs else None
    transform = model.transform()
    out_dir = output_folder(args.out)
    results, used = [], set()
    if args.tile is not None:
        model.tile_geometry()  # a method that does not tile says so before any image is read
    together = args.tile is not None or bool(model._split_state_names())
    mine = range(len(args.images)) if together else distributed.shard(len(args.images))
    writes = rank == 0 or not together
    for n, path in enumerate(args.images):
        stem = Path(path).stem
        if stem in used:  # same file name from different folders
            stem = f"{stem}_{n}"
        used.add(stem)
        if n not in mine:
            continue
        if args.tile is not None:
            results.append(_predict_tiled(model, path, stem, out_dir, args.tile, writes))
            continue
        image = load_image(path)
        item = {
            "image": image,
            "mask": torch.zeros(image.shape[-2:], dtype=torch.bool),
            "has_mask": False,
            "label": 0,
            "defect": "",
            "path": str(path),
        }
        if pairs:
            item["template"] = template
        if transform is not None:
            item = transform(item)
        pred = model._predict_items([item])[1]
        score = float(pred.scores[0])
        entry = {
            "path": str(path),
            "score": score,
            "anomalous": None if pred.threshold is None else score > pred.threshold,
        }
        if pred.maps is not None and writes:  # methods that score whole images only have no map
            amap = pred.maps[0]
            vmin, vmax = float(amap.min()), float(amap.max())
            viz.save_map_png(out_dir / f"{stem}_map.png", amap, vmin=vmin, vmax=vmax)
            viz.save_png(out_dir / f"{stem}_overlay.png", viz.overlay(item["image"], amap))
            entry.update({"map": f"{stem}_map.png", "map_range": [vmin, vmax], "overlay": f"{stem}_overlay.png"})
        results.append(entry)
        if writes:
            print(
                f"{path}: score {score:.6g}"
                + ("" if pred.threshold is None else f" ({'anomalous' if score > pred.threshold else 'good'})")
            )
    if not together:  # each process scored its block of the images, in order
        results = [entry for part in distributed.all_gather_objects(results) for entry in part]
    if rank == 0:
        write_json(
            out_dir / "scores.json",
            {
                "model": str(args.model),
                "threshold": model.threshold_,
                **({"template": str(args.template)} if pairs else {}),
                "images": results,
            },
        )
    distributed.barrier()
    return 0


def _predict_tiled(model, path: str, stem: str, out_dir: Path, tile: int, writes: bool = True) -> dict[str, Any]:
    """One image at its own resolution, tile by tile: the map as a float32 GeoTIFF (with the
    input's CRS and geotransform when it has them; NaN where it has no data) and a quick-look PNG,
    both written only once complete. GDAL's block cache is capped so that memory stays bounded
    by the tile. ``writes`` False: a process of a group that helps with the tiles and writes
    nothing."""
    with gdal_cache():
        reader = open_image(path)
        georeferenced = reader if isinstance(reader, RasterReader) else None
        try:
            _, height, width = reader.shape
            start = time.perf_counter()
            if writes:
                with MapWriter(
                    out_dir / f"{stem}_map.tif",
                    height,
                    width,
                    like=georeferenced,
                    quicklook=out_dir / f"{stem}_quicklook.png",
                ) as writer:
                    result = predict_large(model, reader, tile=tile, out=writer)
            else:
                result = predict_large(model, reader, tile=tile)
            elapsed = time.perf_counter() - start
        finally:
            if callable(getattr(reader, "close", None)):
                reader.close()
    threshold = model.threshold_
    anomalous = None if threshold is None else result.score > threshold
    if writes:
        print(
            f"{path}: score {result.score:.6g}"
            + ("" if anomalous is None else f" ({'anomalous' if anomalous else 'good'})")
            + f"; {height} x {width} px in {elapsed:.1f} s ({height * width / 1e6 / elapsed:.2f} MP/s)"
        )
    return {
        "path": str(path),
        "score": result.score,
        "anomalous": anomalous,
        "map": f"{stem}_map.tif",
        "quicklook": f"{stem}_quicklook.png",
        "size": [height, width],
        "seconds": elapsed,
    }


def cmd_evaluate(args: argparse.Namespace) -> int:
    # Any model file: a method fitted on normal images, or a Siamese detector on change pairs.
    model = load_model(args.model, device=args.device)
    dataset = open_dataset(args.data, "test")  # evaluate applies the method's transform()
    for name, why in getattr(dataset, "skipped", {}).items():
        print(f"  skipped {name}: {why}")
    result = evaluate(model, dataset)
    report_dir = output_folder(args.report, "--report")
    write_json(
        report_dir / "metrics.json",
        dict(result.metrics, per_defect=result.per_defect, model=str(args.model), data=str(args.data)),
    )
    info = {"method": model.method_name, "file": str(args.model), "parameters": model.get_params()}
    path = write_report(
        result, report_dir, title=f"fastad {model.method_name} on {Path(args.data).name}", model_info=info
    )
    for key in (
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "f1_max",
        "threshold",
        "latency_ms",
        "throughput_img_s",
        "n_images",
    ):
        value = result.metrics.get(key)
        print(f"  {key:18s} {'n/a' if value is None else (f'{value:.4f}' if isinstance(value, float) else value)}")
    print(f"report: {path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = build_info()
    print(
        f"fastad {info['version']} (built against torch {info['torch_version']}; torch {torch.__version__} installed)"
    )
    print(
        f"  CUDA kernels: {'yes, for ' + info['cuda_archs'] if info['cuda'] else 'not built'}; "
        f"OpenMP: {'yes' if info['openmp'] else 'no'}, {info['threads']} threads"
    )
    print("devices:")
    print(f"  cpu ({os.cpu_count()} cores)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        print("  no CUDA device")
    print(f"methods: {', '.join(available_methods()) or 'none registered'}")
    print("backbones:")
    try:
        backbones = available_backbones()
    except ImportError as exc:  # no torchvision/timm in this environment
        print(f"  unavailable: {exc}")
        return 0
    for name, status in backbones.items():
        if status["available"]:
            print(f"  {name:18s} available: {status['path']}")
        else:
            print(f"  {name:18s} weights missing: {status['how_to_provide']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastad", description="Visual anomaly detection with pretrained deep features."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit a method on normal images and write a model file")
    p.add_argument("--method", required=True, help="method name (see `fastad info`)")
    p.add_argument("--backbone", help="backbone name, for methods that take one")
    p.add_argument("--data", required=True, help="data folder (MVTec AD category or plain folder)")
    p.add_argument("--model", required=True, help="model file to write (.safetensors)")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other method parameter (repeatable)")
    p.add_argument(
        "--tile",
        type=int,
        metavar="PX",
        help="fit at native resolution, each image read in tiles of PX pixels (PatchCore, SPADE, MLF-SC; "
        "give --set resize=null --set crop=null); no images are held back for a threshold",
    )
    p.set_defaults(run=cmd_fit)

    p = sub.add_parser("predict", help="score images; write maps as PNG and scores as JSON")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device")
    p.add_argument(
        "--tile",
        type=int,
        metavar="PX",
        help="score each image at its own resolution in tiles of PX pixels (PatchCore, SPADE, MLF-SC; GeoTIFF, "
        "TIFF, PNG, JPEG or .npy): the map as a GeoTIFF with the input's georeference, and a quick-look",
    )
    p.add_argument(
        "--template",
        help="for a Siamese detector: the template every image is compared with (same size as the images)",
    )
    p.add_argument("images", nargs="+", help="image files")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("evaluate", help="metrics and an HTML report on a labelled test set")
    p.add_argument("--model", required=True, help="model file (any method, or a Siamese detector)")
    p.add_argument(
        "--data",
        required=True,
        help="test set: MVTec layout or good/ and defect folders; change pairs (A/, B/, label/) for a Siamese detector",
    )
    p.add_argument("--report", required=True, help="folder for metrics.json and report.html")
    p.add_argument("--device")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("info", help="build, devices, methods and available backbone weights")
    p.set_defaults(run=cmd_info)

    add_siamese_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on a bad command line
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in model files that say how they were made
    try:
        status = args.run(args)
        distributed.leave_environment_group()  # a torchrun job's group, torn down once all are done
        return status
    # OSError: unreadable or unwritable paths; ArithmeticError: a diverged training run.
    except (CliError, ValueError, TypeError, OSError, RuntimeError, ImportError, ArithmeticError) as exc:
        print(f"fastad {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

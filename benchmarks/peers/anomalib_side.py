"""anomalib 2.x's PatchCore or PaDiM on an MVTec-layout category, for comparison with fastad's.

Run with the Python of a separate environment that has anomalib (never fastad's, which must not
depend on it, and never importing fastad, which is not installed there)::

    /work/anomalib-venv/bin/python benchmarks/peers/anomalib_side.py --method padim \
        --data ../shared/data/magnetic_tile --weights lite0_timm.safetensors --out result.json

The models are anomalib's own (``anomalib_models``); their torch models are called directly
rather than through anomalib's Engine, which sets up loggers, checkpoints and a data module whose
defaults (square resize, ImageNet normalisation, masks read its own way) would make the inputs
differ from fastad's. Metrics are anomalib's own classes (``anomalib.metrics``' AUROC and AUPRO,
torchmetrics underneath).

What is written here instead, to give both libraries identical inputs:

* images and masks are read and resized as fastad does (``mvtec_inputs``);
* the backbone's ImageNet weights: anomalib would download timm's, which is impossible offline,
  so the timm-named state dict given by ``--weights`` (exported by the driver from fastad's
  EfficientNet-Lite0 mapping) is loaded into its timm feature extractor with ``strict=True``;
* the input normalisation (``--normalize``): EfficientNet-Lite0 was trained on
  (x - 127/255) / (128/255); anomalib's pre-processors would apply ImageNet's mean/std.

Writes a JSON file (metrics, timings, configuration, versions, the image paths in order) and,
with ``--arrays``, an .npz of the per-image scores, labels, anomaly maps, masks and the first
preprocessed images, so the driver can recompute the metrics and check the inputs matched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from anomalib_models import TIMM_BACKBONE, build_padim, build_patchcore, fit_padim, fit_patchcore
from mvtec_inputs import Preprocess, evenly_spaced, list_samples

# EfficientNet-Lite0's training normalisation on [0, 1] images, and ImageNet's (anomalib's default).
NORMALIZATIONS = {
    "lite0": ((127 / 255,) * 3, (128 / 255,) * 3),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# tf_efficientnet_lite0's layers in timm's feature_info names (fastad's names in the driver).
DEFAULT_LAYERS = {
    "patchcore": ("blocks.2", "blocks.4"),  # strides 8, 16
    "padim": ("blocks.1", "blocks.2", "blocks.4"),  # strides 4, 8, 16
}
ANOMALIB_CLASS = {"patchcore": "Patchcore", "padim": "Padim"}


def predict(module, images, normalize):
    """Image scores (B,) and anomaly maps (B, S, S) from anomalib's torch model in eval mode."""
    import torch

    with torch.no_grad():
        out = module.model(normalize(images))
    return out.pred_score.reshape(-1), out.anomaly_map.reshape(images.shape[0], *images.shape[-2:])


def latency_ms(module, images, normalize, repeats: int) -> float:
    """Median wall time of one batch-1 prediction (after one warm-up), in milliseconds: the
    protocol of fastad.evaluation."""
    predict(module, images[:1], normalize)
    times = []
    for i in range(min(repeats, images.shape[0])):
        start = time.perf_counter()
        predict(module, images[i : i + 1], normalize)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def throughput_img_s(module, images, normalize, batch: int, repeats: int = 3) -> float:
    """Images per second of a prediction on ``batch`` images (the test images repeated when
    fewer): the median of ``repeats`` timed calls after a warm-up at that batch size, the
    protocol of fastad.evaluation."""
    reps = -(-batch // images.shape[0])
    block = images.repeat(reps, 1, 1, 1)[:batch]
    predict(module, block, normalize)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(module, block, normalize)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def unit_range(values):
    """``values`` mapped affinely onto [0, 1] (float64 arithmetic, returned as float32).

    anomalib's AUROC is torchmetrics' BinaryROC, which takes any value outside [0, 1] for a logit
    and applies a sigmoid: raw PatchCore and PaDiM distances (about 10 to 40) would all saturate
    to 1.0 and tie, giving an AUROC of 0.5. anomalib's own pipeline avoids that with its
    PostProcessor's normalisation (clamped, so it can create ties of its own); a global min-max
    map is monotone and leaves every rank metric unchanged."""
    v = values.double()
    low, high = v.min(), v.max()
    return ((v - low) / (high - low) if high > low else v - low).float()


def anomalib_metrics(labels, scores, masks, maps) -> dict[str, float | None]:
    """Image AUROC, pixel AUROC and AUPRO (FPR limit 0.3) with anomalib's metric classes, on
    scores and maps mapped onto [0, 1] (see :func:`unit_range`)."""
    import torch
    from anomalib.metrics.aupro import _AUPRO
    from anomalib.metrics.auroc import _AUROC

    out: dict[str, float | None] = {"image_auroc": None, "pixel_auroc": None, "aupro": None}
    if bool((labels == 0).any() and (labels == 1).any()):
        image = _AUROC()
        image.update(unit_range(scores), labels)
        out["image_auroc"] = float(image.compute())
    if bool(masks.any() and (~masks).any()):
        unit_maps = unit_range(maps)
        pixel = _AUROC()
        pixel.update(unit_maps.flatten(), masks.flatten().long())
        out["pixel_auroc"] = float(pixel.compute())
        pro = _AUPRO(fpr_limit=0.3)
        pro.update(unit_maps, masks.to(torch.uint8))
        out["aupro"] = float(pro.compute())
    return out


# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=sorted(DEFAULT_LAYERS), default="patchcore")
    p.add_argument("--data", type=Path, required=True, help="MVTec-layout category folder")
    p.add_argument(
        "--weights", type=Path, required=True, help="timm-named tf_efficientnet_lite0 state dict (.safetensors)"
    )
    p.add_argument("--out", type=Path, required=True, help="results JSON to write")
    p.add_argument("--arrays", type=Path, default=None, help="optional .npz of scores, maps, masks for the driver")
    p.add_argument("--layers", nargs="+", default=None, help="timm feature_info module names (default: the method's)")
    p.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore only")
    p.add_argument("--num-neighbors", type=int, default=9, help="PatchCore only")
    p.add_argument("--n-features", type=int, default=None, help="PaDiM only (and needed there): channels kept")
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--normalize", choices=sorted(NORMALIZATIONS), default="lite0")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=None, help="evenly spaced subset of the training images")
    p.add_argument("--limit", type=int, default=None, help="evenly spaced subset of the test images")
    p.add_argument("--latency-images", type=int, default=10)
    p.add_argument("--throughput-batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-malloc-fix",
        dest="malloc_fix",
        action="store_false",
        help="PatchCore only: leave glibc's allocator thresholds alone during the coreset "
        "(see anomalib_models.set_malloc_thresholds)",
    )
    args = p.parse_args(argv)
    if not args.data.is_dir():
        p.error(f"--data {args.data}: no such folder")
    if not args.weights.is_file():
        p.error(f"--weights {args.weights}: no such file")
    if args.weights.suffix != ".safetensors":
        p.error(f"--weights {args.weights}: expected a .safetensors file")
    if not 0.0 < args.coreset_ratio <= 1.0:
        p.error(f"--coreset-ratio must be in (0, 1], got {args.coreset_ratio}")
    for name in ("train_limit", "limit"):
        value = getattr(args, name)
        if value is not None and value < 2:
            p.error(f"--{name.replace('_', '-')} must be at least 2, got {value}")
    if args.method == "padim" and (args.n_features is None or args.n_features < 1):
        # anomalib has no default for this backbone (its defaults are ResNet-18's and WRN-50's).
        p.error(f"--method padim needs --n-features, a positive number of channels, got {args.n_features}")
    if args.layers is None:
        args.layers = list(DEFAULT_LAYERS[args.method])
    return args


def write_atomically(path: Path, write) -> None:
    """Writes through a temporary file in the same folder, renamed into place when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def use_threads(count: int) -> None:
    """Makes torch, and OpenMP and MKL under it, use ``count`` threads.

    Through the environment before torch is first imported, rather than with
    ``torch.set_num_threads``: under torch 2.14.1 any ``set_num_threads`` call (even to the count
    it already has) makes later batched LU factorisations fail inside MKL ("Parameter 6 was
    incorrect on entry to SLASWP") and spin for many minutes (pytorch/pytorch#141358, #142815).
    anomalib's PaDiM fit inverts its 3136 covariances in one batched ``torch.linalg.inv``, which
    had not finished after 15 minutes that way (it takes 0.6 s). ``set_num_threads`` stays the
    fallback where torch was imported already with another count."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(count)
    import torch

    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def build_and_fit(
    args: argparse.Namespace, train_paths: list[Path], prep: Preprocess, normalize
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The method's anomalib module, fitted; returns (module, weights report, fit timings)."""
    layers = tuple(args.layers)
    if args.method == "patchcore":
        module, report = build_patchcore(
            layers, args.weights, coreset_ratio=args.coreset_ratio, num_neighbors=args.num_neighbors
        )
        return module, report, fit_patchcore(module, train_paths, prep, normalize, args.batch_size, args.malloc_fix)
    module, report = build_padim(layers, args.weights, n_features=args.n_features)
    return module, report, fit_padim(module, train_paths, prep, normalize, args.batch_size)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # anomalib's coreset draws a progress bar per selected patch: tens of thousands of lines.
    os.environ.setdefault("TQDM_DISABLE", "1")
    use_threads(args.threads)
    import numpy as np
    import torch

    # anomalib's coreset start, sparse projection and PaDiM's channel permutation draw from these.
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    import anomalib
    import timm
    import torchvision

    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS[args.normalize])

    def normalize(images: torch.Tensor) -> torch.Tensor:
        return (images - mean) / std

    prep = Preprocess(args.resize, args.crop)
    train = evenly_spaced(list_samples(args.data, "train"), args.train_limit)
    test = evenly_spaced(list_samples(args.data, "test"), args.limit)
    module, load_report, timings = build_and_fit(args, [s[0] for s in train], prep, normalize)

    images = torch.stack([prep.image(s[0]) for s in test])
    masks = torch.stack([prep.mask(s[3], s[0]) for s in test])
    labels = torch.tensor([s[1] for s in test])
    scores, maps = [], []
    for start in range(0, len(test), args.batch_size):
        s, m = predict(module, images[start : start + args.batch_size], normalize)
        scores.append(s)
        maps.append(m)
    scores, maps = torch.cat(scores), torch.cat(maps)
    metrics = anomalib_metrics(labels, scores, masks, maps)
    metrics["latency_ms"] = latency_ms(module, images, normalize, args.latency_images)
    metrics["throughput_img_s"] = throughput_img_s(module, images, normalize, args.throughput_batch)

    config = {
        "method": args.method,
        "backbone": TIMM_BACKBONE,
        "layers": list(args.layers),
        "resize": args.resize,
        "crop": args.crop,
        "normalize": args.normalize,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "n_train": len(train),
        "n_test": len(test),
        "latency_images": args.latency_images,
        "throughput_batch": args.throughput_batch,
    }
    if args.method == "patchcore":
        config.update(coreset_ratio=args.coreset_ratio, num_neighbors=args.num_neighbors)
    else:
        config.update(n_features=args.n_features)
    result = {
        "method": f"anomalib {anomalib.__version__} {ANOMALIB_CLASS[args.method]}",
        "metrics": metrics,
        "metrics_source": (
            "anomalib.metrics (_AUROC, _AUPRO with fpr_limit=0.3) on scores and maps min-max mapped onto [0, 1]"
        ),
        "timings": timings,
        "weights": load_report,
        "config": config,
        "versions": {
            "python": platform.python_version(),
            "anomalib": anomalib.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
        },
        "test_paths": [str(s[0]) for s in test],
    }
    if args.arrays is not None:
        write_atomically(
            args.arrays,
            lambda p: np.savez(
                p,
                scores=scores.numpy(),
                labels=labels.numpy(),
                maps=maps.numpy().astype(np.float32),
                masks=masks.numpy(),
                first_images=images[:4].numpy(),
            ),
        )
    write_atomically(args.out, lambda p: p.write_text(json.dumps(result, indent=2)))
    print(json.dumps({"metrics": metrics, "timings": timings}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

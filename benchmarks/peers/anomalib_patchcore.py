"""anomalib 2.x's PatchCore on an MVTec-layout category, for comparison with fastad's.

Run with the Python of a separate environment that has anomalib (never fastad's, which must not
depend on it, and never importing fastad, which is not installed there)::

    /work/anomalib-venv/bin/python benchmarks/peers/anomalib_patchcore.py \
        --data ../shared/data/magnetic_tile --weights lite0_timm.safetensors --out result.json

What is anomalib's own code here: the Lightning module ``anomalib.models.Patchcore`` and its torch
model (timm feature extractor, 3x3 average pooling, layer concatenation, the memory bank, the
k-center-greedy coreset on a sparse random projection, nearest-neighbour scoring, the image-score
reweighting, the upsampled and blurred anomaly map) and the metrics (``anomalib.metrics``' AUROC
and AUPRO, torchmetrics underneath). The torch model is called directly rather than through
anomalib's Engine: the Engine sets up loggers, checkpoints and a data module whose defaults
(square resize, ImageNet normalisation, masks read its own way) would make the inputs differ
from fastad's.

What is written here instead, to give both libraries identical inputs:

* images and masks are read with PIL (grey repeated to RGB, /255; masks >= 128 of 255), resized
  with torchvision (shorter side ``--resize``, bilinear with antialiasing for images,
  nearest-exact for masks) and centre-cropped to ``--crop``: what fastad's ``ResizeCrop`` does;
* the backbone's ImageNet weights: anomalib would download timm's, which is impossible offline,
  so the model is built with ``pre_trained=False`` and the timm-named state dict given by
  ``--weights`` (exported by the driver from fastad's EfficientNet-Lite0 mapping) is loaded into
  its timm feature extractor with ``strict=True``;
* the input normalisation (``--normalize``): EfficientNet-Lite0 was trained on
  (x - 127/255) / (128/255); anomalib's PatchCore pre-processor would apply ImageNet's mean/std.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
GOOD = "good"
MASK_THRESHOLD = 128  # grey level at or above which a mask pixel is a defect (as fastad.data)
# EfficientNet-Lite0's training normalisation on [0, 1] images, and ImageNet's (anomalib's default).
NORMALIZATIONS = {
    "lite0": ((127 / 255,) * 3, (128 / 255,) * 3),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# The classifier head of the full timm network: absent from the features_only extractor.
HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")
TIMM_BACKBONE = "tf_efficientnet_lite0"
# Strides 8 and 16 of tf_efficientnet_lite0 in timm's feature_info names (fastad: block2, block4).
DEFAULT_LAYERS = ("blocks.2", "blocks.4")


# ------------------------------------------------------------------------------------------------
# Data: the MVTec layout, listed and ordered as fastad.data.MVTecDataset does


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, by extension (any case), no dot files, sorted."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def list_samples(root: Path, split: str) -> list[tuple[Path, int, str, Path | None]]:
    """(image, label 0/1, defect, mask path or None) of ``split``; test sorted by defect, then name."""
    if split == "train":
        folder = root / "train" / GOOD
        if not folder.is_dir():
            raise FileNotFoundError(f"{root} is not an MVTec-layout category: missing folder {folder}")
        return [(p, 0, GOOD, None) for p in list_images(folder)]
    test = root / "test"
    if not test.is_dir():
        raise FileNotFoundError(f"{root} is not an MVTec-layout category: missing folder {test}")
    samples = []
    for folder in sorted(p for p in test.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in list_images(folder):
            if folder.name == GOOD:
                samples.append((path, 0, GOOD, None))
                continue
            mask = root / "ground_truth" / folder.name / f"{path.stem}_mask.png"
            if not mask.is_file():
                raise FileNotFoundError(f"mask not found for test image {path}: expected {mask}")
            samples.append((path, 1, folder.name, mask))
    return samples


def evenly_spaced(items: list, limit: int | None) -> list:
    """``limit`` items spread evenly over the list (first and last included), or all of them.

    The driver applies the same rule to fastad's data sets, so both sides see the same images."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 2:
        return items[:limit]
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


class Preprocess:
    """Reads an image (float32 (3, S, S) in [0, 1]) and its mask (bool (S, S)), S = ``crop``:
    shorter side resized to ``resize`` (images bilinear + antialias, masks nearest-exact), then
    the centre ``crop`` x ``crop``."""

    def __init__(self, resize: int, crop: int) -> None:
        self.resize, self.crop = resize, crop

    def image(self, path: Path):
        import numpy as np
        import torch
        from PIL import Image, ImageOps
        from torchvision.transforms.v2 import functional as TF

        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
            array = np.asarray(rgb, dtype=np.uint8).copy()
        image = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
        low, high = float(image.min()), float(image.max())
        image = TF.resize(image, [self.resize], antialias=True).clamp_(low, high)
        return TF.center_crop(image, [self.crop]).contiguous()

    def mask(self, path: Path | None, like_image: Path):
        import numpy as np
        import torch
        from PIL import Image, ImageOps
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        if path is None:
            with Image.open(like_image) as im:
                width, height = ImageOps.exif_transpose(im).size
            mask = torch.zeros(1, height, width, dtype=torch.uint8)
        else:
            with Image.open(path) as im:
                grey = np.asarray(ImageOps.exif_transpose(im).convert("L"), dtype=np.uint8)
            mask = torch.from_numpy((grey >= MASK_THRESHOLD).astype(np.uint8))[None]
        mask = TF.resize(mask, [self.resize], interpolation=InterpolationMode.NEAREST_EXACT)
        return TF.center_crop(mask, [self.crop])[0].bool().contiguous()


def batches(paths: list[Path], prep: Preprocess, batch_size: int) -> Iterator[Any]:
    """Preprocessed images (B, 3, S, S), ``batch_size`` at a time."""
    import torch

    for start in range(0, len(paths), batch_size):
        yield torch.stack([prep.image(p) for p in paths[start : start + batch_size]])


# ------------------------------------------------------------------------------------------------
# The model


def build_patchcore(layers: tuple[str, ...], coreset_ratio: float, num_neighbors: int, weights: Path):
    """anomalib's Patchcore Lightning module with the backbone's weights loaded from ``weights``.

    Returns (module, load report). Raises ValueError when the file does not fit the extractor
    exactly (missing, unexpected or wrongly shaped tensors)."""
    from anomalib.models import Patchcore
    from safetensors.torch import load_file

    module = Patchcore(
        backbone=TIMM_BACKBONE,
        layers=layers,
        pre_trained=False,  # no download; the weights come from the file below
        coreset_sampling_ratio=coreset_ratio,
        num_neighbors=num_neighbors,
        pre_processor=False,
        post_processor=False,
        evaluator=False,
        visualizer=False,
    )
    extractor = module.model.feature_extractor
    if list(extractor.layers) != list(layers):
        raise ValueError(f"anomalib's extractor kept layers {extractor.layers} of the {list(layers)} asked for")
    network = extractor.feature_extractor  # timm EfficientNetFeatures
    state = load_file(str(weights), device="cpu")
    head = sorted(k for k in state if k.startswith(HEAD_PREFIXES))
    body = {k: v.contiguous() for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    expected = network.state_dict()
    wrong = [k for k in body if k in expected and tuple(body[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise ValueError(f"{weights}: tensors of the wrong shape for {TIMM_BACKBONE}: {wrong[:5]}")
    result = network.load_state_dict(body, strict=True)  # raises on any missing/unexpected key
    report = {
        "file": str(weights),
        "tensors_loaded": len(body),
        "head_tensors_dropped": len(head),
        "missing_keys": list(result.missing_keys),
        "unexpected_keys": list(result.unexpected_keys),
        "extractor": type(network).__name__,
        "layer_indices": list(extractor.idx),
        "channels": list(extractor.out_dims),
        "strides": list(extractor.reductions),
    }
    return module, report


# glibc's mallopt parameters.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """Sets glibc's mmap and trim thresholds (bytes) for this process; False where there is no
    glibc (the call is then a no-op).

    Why: anomalib's coreset loop allocates and frees one (patches x projection) float32
    temporary per selected patch. Under glibc's default, dynamic thresholds those blocks are
    carved from the heap and the process grows by about one block per iteration (40 magnetic-
    tile images ran a 24 GiB machine out of memory). A fixed 1 MiB mmap threshold hands each block
    back to the system when freed. It also makes every large allocation page-fault afresh, which
    would slow scoring by 2-3x, so after the coreset the thresholds are set to the values the
    dynamic default settles at (32 MiB mmap, twice that for trimming).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(mmap_bytes))) and bool(mallopt(M_TRIM_THRESHOLD, int(trim_bytes)))


def fit(module, paths: list[Path], prep: Preprocess, normalize, batch_size: int, malloc_fix: bool = True) -> dict[str, Any]:
    """Feature extraction over the training images, then anomalib's coreset; returns timings (s)
    and sizes. ``malloc_fix``: see :func:`set_malloc_thresholds`."""
    import torch

    model = module.model
    model.train()  # anomalib's torch model stores embeddings in train mode (its extractor stays in eval)
    start = time.perf_counter()
    with torch.no_grad():
        for images in batches(paths, prep, batch_size):
            model(normalize(images))
    extracted = time.perf_counter()
    n_patches = sum(e.shape[0] for e in model.embedding_store)
    fixed = malloc_fix and set_malloc_thresholds(1 << 20, 2 << 20)
    module.fit()  # anomalib's Patchcore.fit: KCenterGreedy coreset into the memory bank
    done = time.perf_counter()
    if fixed:
        set_malloc_thresholds(32 << 20, 64 << 20)
    model.eval()
    return {
        "fit_s": done - start,
        "load_and_extract_s": extracted - start,
        "coreset_s": done - extracted,
        "n_patches": n_patches,
        "bank_size": int(model.memory_bank.shape[0]),
        "embedding_dim": int(model.memory_bank.shape[1]),
        "malloc_fix_applied": bool(fixed),
    }


def predict(module, images, normalize):
    """Image scores (B,) and anomaly maps (B, S, S) from anomalib's torch model in eval mode."""
    import torch

    with torch.no_grad():
        out = module.model(normalize(images))
    return out.pred_score.reshape(-1), out.anomaly_map.reshape(images.shape[0], *images.shape[-2:])


def latency_ms(module, images, normalize, repeats: int) -> float:
    """Median wall time of one batch-1 prediction (after one warm-up), in milliseconds."""
    predict(module, images[:1], normalize)
    times = []
    for i in range(min(repeats, images.shape[0])):
        start = time.perf_counter()
        predict(module, images[i : i + 1], normalize)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def unit_range(values):
    """``values`` mapped affinely onto [0, 1] (float64 arithmetic, returned as float32).

    anomalib's AUROC is torchmetrics' BinaryROC, which takes any value outside [0, 1] for a logit
    and applies a sigmoid: raw PatchCore distances (about 10 to 40) would all saturate to 1.0 and
    tie, giving an AUROC of 0.5. anomalib's own pipeline avoids that with its PostProcessor's
    normalisation (clamped, so it can create ties of its own); a global min-max map is monotone
    and leaves every rank metric unchanged."""
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
    p.add_argument("--data", type=Path, required=True, help="MVTec-layout category folder")
    p.add_argument("--weights", type=Path, required=True, help="timm-named tf_efficientnet_lite0 state dict (.safetensors)")
    p.add_argument("--out", type=Path, required=True, help="results JSON to write")
    p.add_argument("--arrays", type=Path, default=None, help="optional .npz of scores, maps, masks for the driver")
    p.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS), help="timm feature_info module names")
    p.add_argument("--coreset-ratio", type=float, default=0.1)
    p.add_argument("--num-neighbors", type=int, default=9)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--normalize", choices=sorted(NORMALIZATIONS), default="lite0")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=None, help="evenly spaced subset of the training images")
    p.add_argument("--limit", type=int, default=None, help="evenly spaced subset of the test images")
    p.add_argument("--latency-images", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-malloc-fix", dest="malloc_fix", action="store_false",
        help="leave glibc's allocator thresholds alone during the coreset (see set_malloc_thresholds)",
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # anomalib's coreset draws a progress bar per selected patch: tens of thousands of lines.
    os.environ.setdefault("TQDM_DISABLE", "1")
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # anomalib's coreset start and sparse projection draw from these
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

    module, load_report = build_patchcore(tuple(args.layers), args.coreset_ratio, args.num_neighbors, args.weights)
    timings = fit(module, [s[0] for s in train], prep, normalize, args.batch_size, args.malloc_fix)

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

    result = {
        "method": f"anomalib {anomalib.__version__} Patchcore",
        "metrics": metrics,
        "metrics_source": "anomalib.metrics (_AUROC, _AUPRO with fpr_limit=0.3) on scores and maps min-max mapped onto [0, 1]",
        "timings": timings,
        "weights": load_report,
        "config": {
            "backbone": TIMM_BACKBONE, "layers": list(args.layers), "coreset_ratio": args.coreset_ratio,
            "num_neighbors": args.num_neighbors, "resize": args.resize, "crop": args.crop,
            "normalize": args.normalize, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "seed": args.seed, "n_train": len(train), "n_test": len(test),
        },
        "versions": {
            "python": platform.python_version(), "anomalib": anomalib.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__,
        },
        "test_paths": [str(s[0]) for s in test],
    }
    if args.arrays is not None:
        write_atomically(args.arrays, lambda p: np.savez(
            p, scores=scores.numpy(), labels=labels.numpy(), maps=maps.numpy().astype(np.float32),
            masks=masks.numpy(), first_images=images[:4].numpy(),
        ))
    write_atomically(args.out, lambda p: p.write_text(json.dumps(result, indent=2)))
    print(json.dumps({"metrics": metrics, "timings": timings}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

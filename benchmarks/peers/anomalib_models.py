"""anomalib 2.x's PatchCore and PaDiM on fastad's EfficientNet-Lite0 weights, and their fits.

Runs in anomalib's environment and never imports fastad. What is anomalib's own code: the
Lightning modules ``anomalib.models.Patchcore`` / ``Padim`` and their torch models (timm feature
extractor, the layer concatenation, PatchCore's 3x3 pooling, memory bank and k-center-greedy
coreset, PaDiM's random channel subset and per-position Gaussians, the scoring and the upsampled,
blurred anomaly maps). What is written here: building them without a download (``pre_trained=
False``, then fastad's weights loaded strictly into the timm extractor), running their torch
models over the training images in train mode (where both store the embeddings) and calling the
Lightning module's ``fit``, with the time each step took.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mvtec_inputs import Preprocess, batches

TIMM_BACKBONE = "tf_efficientnet_lite0"
# The classifier head of the full timm network: absent from the features_only extractor.
HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")
# anomalib's pre/post-processing, evaluation and visualisation are left out: the inputs are
# prepared as fastad's, the metrics computed by the caller on the raw scores and maps.
NO_PIPELINE = {"pre_processor": False, "post_processor": False, "evaluator": False, "visualizer": False}

Normalize = Callable[[Any], Any]


def load_lite0_weights(extractor, layers: tuple[str, ...], weights: Path) -> dict[str, Any]:
    """Loads the timm-named state dict in ``weights`` (.safetensors) into anomalib's
    ``TimmFeatureExtractor`` with ``strict=True`` and returns a report of what was loaded, the
    layers' feature_info indices, channels and strides.

    Raises ValueError when the extractor did not keep all of ``layers`` or a tensor has the wrong
    shape; ``load_state_dict`` raises on any missing or unexpected key."""
    from safetensors.torch import load_file

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
    result = network.load_state_dict(body, strict=True)
    return {
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


def build_patchcore(layers: tuple[str, ...], weights: Path, *, coreset_ratio: float, num_neighbors: int):
    """anomalib's Patchcore Lightning module on ``weights``; returns (module, load report)."""
    from anomalib.models import Patchcore

    module = Patchcore(
        backbone=TIMM_BACKBONE,
        layers=layers,
        pre_trained=False,
        coreset_sampling_ratio=coreset_ratio,
        num_neighbors=num_neighbors,
        **NO_PIPELINE,
    )
    return module, load_lite0_weights(module.model.feature_extractor, layers, weights)


def build_padim(layers: tuple[str, ...], weights: Path, *, n_features: int):
    """anomalib's Padim Lightning module on ``weights``, keeping ``n_features`` channels of the
    concatenated layers; returns (module, load report).

    anomalib draws the kept channels once, at construction, as ``torch.randperm(total)[:n]``
    from torch's global generator (seed it first): with ``n_features`` = total that is every
    channel, in a shuffled order, which changes no Mahalanobis distance. The report says whether
    every channel was kept."""
    from anomalib.models import Padim

    module = Padim(backbone=TIMM_BACKBONE, layers=list(layers), pre_trained=False, n_features=n_features, **NO_PIPELINE)
    report = load_lite0_weights(module.model.feature_extractor, layers, weights)
    model = module.model
    kept = sorted(int(i) for i in model.idx)
    report.update(
        {
            "n_features": int(model.n_features),
            "n_features_original": int(model.n_features_original),
            "all_channels_kept": kept == list(range(model.n_features_original)),
        }
    )
    return module, report


def store_training_embeddings(
    module, paths: list[Path], prep: Preprocess, normalize: Normalize, batch_size: int
) -> float:
    """Runs anomalib's torch model over the training images in train mode, where PatchCore and
    PaDiM both append each batch's embeddings to their memory (their timm extractor puts itself
    in eval mode on every call, so batch norms use their running statistics). Returns seconds,
    reading and resizing the images included."""
    import torch

    model = module.model
    model.train()
    start = time.perf_counter()
    with torch.no_grad():
        for images in batches(paths, prep, batch_size):
            model(normalize(images))
    return time.perf_counter() - start


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


def fit_patchcore(
    module, paths: list[Path], prep: Preprocess, normalize: Normalize, batch_size: int, malloc_fix: bool = True
) -> dict[str, Any]:
    """Feature extraction over the training images, then anomalib's coreset; returns timings (s)
    and sizes. ``malloc_fix``: see :func:`set_malloc_thresholds`."""
    model = module.model
    extract_s = store_training_embeddings(module, paths, prep, normalize, batch_size)
    n_patches = sum(e.shape[0] for e in model.embedding_store)
    fixed = malloc_fix and set_malloc_thresholds(1 << 20, 2 << 20)
    start = time.perf_counter()
    module.fit()  # anomalib's Patchcore.fit: KCenterGreedy coreset into the memory bank
    coreset_s = time.perf_counter() - start
    if fixed:
        set_malloc_thresholds(32 << 20, 64 << 20)
    model.eval()
    return {
        "fit_s": extract_s + coreset_s,
        "load_and_extract_s": extract_s,
        "coreset_s": coreset_s,
        "n_patches": n_patches,
        "bank_size": int(model.memory_bank.shape[0]),
        "embedding_dim": int(model.memory_bank.shape[1]),
        "malloc_fix_applied": bool(fixed),
    }


def fit_padim(module, paths: list[Path], prep: Preprocess, normalize: Normalize, batch_size: int) -> dict[str, Any]:
    """Feature extraction over the training images, then anomalib's Gaussian fit (every
    position's mean and inverse covariance); returns timings (s) and sizes."""
    model = module.model
    extract_s = store_training_embeddings(module, paths, prep, normalize, batch_size)
    n_images = sum(e.shape[0] for e in model.memory_bank)
    grid = list(model.memory_bank[0].shape[-2:])
    start = time.perf_counter()
    module.fit()  # anomalib's Padim.fit: stacks the stored embeddings, MultiVariateGaussian.fit
    gaussian_s = time.perf_counter() - start
    model.eval()
    return {
        "fit_s": extract_s + gaussian_s,
        "load_and_extract_s": extract_s,
        "gaussian_s": gaussian_s,
        "n_train_images": n_images,
        "grid": grid,
        "embedding_dim": int(model.gaussian.mean.shape[0]),
        "positions": int(model.gaussian.mean.shape[1]),
    }

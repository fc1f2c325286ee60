"""Batch-1 predict latency end to end (backbone, method, map), the inline-inspection figure.

    python -m benchmarks.gpu_latency [--device cuda] [--methods patchcore padim]
                                     [--backbones efficientnet_lite0 wide_resnet50_2]
                                     [--random-weights] [--repeats 200] [--json FILE]

For each method and backbone: a model fitted on 16 generated 224 x 224 images (smooth random
colour fields), then ``predict`` on one image, timed ``--repeats`` times after 20 warm-up calls,
the device synchronised before and after each call. Two inputs are timed: the image already on the
device, and the image in host memory (a camera frame before its upload). Each row also counts the
host synchronisations one ``predict`` makes on CUDA (``torch.cuda.set_sync_debug_mode``: every
synchronising call warns) and names where the first few happen: what keeps the call from being
captured by a CUDA graph.

Backbone weights: ImageNet weights where they are installed. A backbone without them is skipped
with the message that says how to provide them, unless ``--random-weights`` is given: then it runs
on random weights (``weights=None``, labelled in the row). Random weights give the same work per
call, so the timing holds; the scores mean nothing. It is never the default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TRAIN_IMAGES, SIDE = 16, 224


def generated_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, SIDE, SIDE) smooth random colour fields with grain, float32 in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, SIDE // 16, SIDE // 16, generator=gen)
    smooth = F.interpolate(coarse, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return (0.2 + 0.6 * smooth + 0.05 * torch.rand(n, 3, SIDE, SIDE, generator=gen)).clamp(0, 1)


def weights_for(backbone: str, random_weights: bool) -> tuple[str | None, str | None]:
    """(weights argument, reason to skip): "imagenet" where installed, None (random) where not and
    allowed, else a skip reason with the how-to-provide text."""
    from fastad.features import available_backbones

    status = available_backbones()[backbone]
    if status["available"]:
        return "imagenet", None
    if random_weights:
        return None, None
    return "imagenet", f"no ImageNet weights for {backbone}: {status['how_to_provide']} (or pass --random-weights)"


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_and_p90_ms(call, device: str, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * statistics.median(times), 1e3 * times[min(len(times) - 1, int(0.9 * len(times)))]


def host_synchronisations(call, device: str) -> tuple[int | None, list[str]]:
    """(number of synchronising CUDA calls in one ``call()``, where the first five come from);
    (None, []) off CUDA, where the question does not arise."""
    if not device.startswith("cuda"):
        return None, []
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return len(syncs), [f"{Path(w.filename).name}:{w.lineno}" for w in syncs[:5]]


def time_one(method: str, backbone: str, device: str, repeats: int, random_weights: bool) -> dict[str, Any]:
    import fastad

    row: dict[str, Any] = {"method": method, "backbone": backbone, "device": device}
    weights, skip = weights_for(backbone, random_weights)
    if skip:
        return {**row, "skipped": skip}
    row["weights"] = "imagenet" if weights else "random (timing only)"
    model = fastad.get_method(method)(
        backbone=backbone, weights=weights, resize=None, crop=None, holdout=0, device=device, batch_size=1
    )
    start = time.perf_counter()
    model.fit(generated_images(TRAIN_IMAGES, seed=0))
    row["fit_s"] = round(time.perf_counter() - start, 2)
    host_image = generated_images(1, seed=1)
    device_image = host_image.to(device)
    for _ in range(20):  # warm-up: kernels chosen, caches and allocator settled
        model.predict(device_image)
    row["latency_ms"], row["latency_p90_ms"] = median_and_p90_ms(lambda: model.predict(device_image), device, repeats)
    row["latency_from_host_ms"], _ = median_and_p90_ms(lambda: model.predict(host_image), device, repeats)
    row["host_syncs_per_predict"], row["sync_sites"] = host_synchronisations(
        lambda: model.predict(device_image), device
    )
    row["repeats"] = repeats
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=["patchcore", "padim"])
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "wide_resnet50_2"])
    parser.add_argument("--random-weights", action="store_true", help="time backbones without weights on random ones")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the rows here, one JSON object per line")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    rows = []
    for backbone in args.backbones:
        for method in args.methods:
            row = time_one(method, backbone, args.device, args.repeats, args.random_weights)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json is not None:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

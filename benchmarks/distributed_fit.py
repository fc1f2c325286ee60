"""Fit (and predict) across processes, against one process: time and what the processes send.

    python -m benchmarks.distributed_fit [--data ../shared/data/magnetic_tile] [--images 64]
        [--methods patchcore patchcore_split padim] [--ranks 1 2 4]

Each run spawns R processes in one gloo group on localhost (``benchmarks.ranks``), each with
cores / R threads, and fits the method on the first ``--images`` good training images (each
process extracts the features of its block, ``fastad.distributed``); ``patchcore_split`` leaves
the bank split across the processes (``shard_bank=True``). Then the test images (``--test``) are
scored: by process 0 alone for a whole model, by all processes together for a split bank.
Reported per R: the fit's wall time, the collectives and the megabytes each process received
(counted by wrapping torch.distributed's collectives), the bank rows each process holds, the
batch-1 latency, and the largest score difference to the one-process fit. On a two-core
machine this measures overhead and correctness, not speed-up: the processes share the cores.
Scores agree to oneDNN's rounding only (~1e-5 relative): convolutions round differently with
the thread count, which changes with R here (the tests use one thread to compare to the bit).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .ranks import CollectiveCounter, launch

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"
METHODS = {
    "patchcore": ("patchcore", {}),
    "patchcore_split": ("patchcore", {"shard_bank": True}),
    "padim": ("padim", {}),
}


def _images(data: str, split: str, count: int, transform):
    import torch

    from fastad.data import open_dataset

    dataset = open_dataset(data, split).with_transform(transform)
    picked = [i for i, sample in enumerate(dataset.samples) if sample.label == (0 if split == "train" else 1)][:count]
    return torch.utils.data.Subset(dataset, picked)


def _rank(rank: int, size: int, method: str, data: str, n_images: int, n_test: int) -> dict | None:
    import torch
    import torch.distributed as dist

    import fastad

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    name, extra = METHODS[method]
    model = fastad.get_method(name)(backbone="efficientnet_lite0", holdout=0, **extra)
    train = _images(data, "train", n_images, model.transform())
    test = torch.stack([item["image"] for item in _images(data, "test", n_test, model.transform())])
    dist.barrier()
    with CollectiveCounter() as counter:
        started = time.perf_counter()
        model.fit(train)
        dist.barrier()
        seconds = time.perf_counter() - started
    split = bool(model._split_state_names())
    held = int(model.bank_.shape[0]) if hasattr(model, "bank_") else None
    scores, latency = None, None
    if split or rank == 0:
        model.predict(test[:1])  # warm
        started = time.perf_counter()
        scores = torch.cat([model.predict(test[i : i + 1]).scores for i in range(test.shape[0])])
        latency = (time.perf_counter() - started) / test.shape[0]
    gathered = [None] * size
    dist.all_gather_object(gathered, (counter.calls, counter.bytes, held))
    if rank != 0:
        return None
    return {
        "seconds": seconds,
        "collectives": [g[0] for g in gathered],
        "bytes": [g[1] for g in gathered],
        "rows": [g[2] for g in gathered],
        "scores": scores.tolist(),
        "latency": latency,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    import torch

    if not Path(args.data).is_dir():
        raise SystemExit(f"no data at {args.data}: give --data (an MVTec-style folder)")
    print(f"fit on {args.images} good images of {args.data}, gloo on localhost, {os.cpu_count()} cores shared")
    for method in args.methods:
        reference = None
        for size in args.ranks:
            res = launch(size, _rank, method, args.data, args.images, args.test)[0]
            res["scores"] = torch.tensor(res["scores"], dtype=torch.float64)  # a list through the queue
            if reference is None:
                reference = res["scores"]
            diff = float(((res["scores"] - reference).abs() / reference.abs().clamp_min(1e-12)).max())
            rows = "" if res["rows"][0] is None else f"; bank rows per process {res['rows']}"
            print(
                f"  {method:16s} {size} process(es): fit {res['seconds']:.2f} s, "
                f"{max(res['collectives'])} collectives, {max(res['bytes']) / 1e6:.2f} MB received per process"
                f"{rows}; batch-1 predict {res['latency'] * 1e3:.1f} ms; "
                f"largest relative score difference to {args.ranks[0]} process(es) {diff:.1e}"
            )


if __name__ == "__main__":
    main()

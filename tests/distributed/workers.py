"""Process bodies for the distributed tests: each rank joins a gloo group on localhost, runs its
part and writes what it got to ``out/<rank>.pt``; a rank that raises writes the error instead.
Spawned (not forked), so they import fastad fresh like a torchrun process."""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=60)


def _join(rank: int, size: int, rendezvous: str) -> None:
    torch.set_num_threads(1)  # the ranks share two cores
    # A rendezvous file rather than a TCP port: a port found free and released for the ranks to
    # bind could be taken by another process in between.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size, timeout=TIMEOUT)


def run(rank: int, size: int, rendezvous: str, out: str, body: str, args: tuple) -> None:
    """Joins the group through the file ``rendezvous`` (new for each group), runs
    ``BODIES[body](rank, size, *args)`` and saves its result."""
    result: object
    try:
        _join(rank, size, rendezvous)
        result = {"ok": BODIES[body](rank, size, *args)}
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which decides
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    torch.save(result, Path(out) / f"{rank}.pt")
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group broken by a dead peer may not close cleanly
            pass


def kcenter_data(seed: int, n: int, d: int, kind: str) -> torch.Tensor:
    """Rows with exact ties and duplicates (small integers) or plain normal ones."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "integers":
        x = torch.randint(-2, 3, (n, d), generator=gen).float()
        x[n // 3] = x[n // 5]  # a duplicate for sure
        return x
    return torch.randn(n, d, generator=gen)


def kcenter(rank: int, size: int, cases: list) -> list:
    from fastad.distributed import CommunicationLog, kcenter_greedy

    results = []
    for seed, n, d, k, start, kind, blocks in cases:
        x = kcenter_data(seed, n, d, kind)
        edges = [0, *torch.tensor(blocks).cumsum(0).tolist()]
        log = CommunicationLog()
        indices, radii = kcenter_greedy(x[edges[rank] : edges[rank + 1]], k, start=start, log=log)
        results.append((indices, radii, log.collectives, log.bytes_received))
    return results


def gaussian(rank: int, size: int, seed: int, positions: int, dim: int, counts: list) -> dict:
    from fastad.gaussian_stats import GaussianAccumulator

    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(c, positions, dim, generator=gen, dtype=torch.float64) * 3 + 5 for c in counts]
    acc = GaussianAccumulator(positions, dim, fourth_moments=True, position_chunk=3)
    for batch in batches[rank::size]:
        acc.update(batch.float())
    acc.all_reduce_()
    return {"count": acc.count, "mean": acc.mean(), "cov": acc.covariance(), "lw": acc.ledoit_wolf()[0]}


def dies(rank: int, size: int, k: int) -> object:
    """Rank 1 leaves mid-selection (before its first collective); the others must fail, not wait."""
    from fastad.distributed import kcenter_greedy

    if rank == 1:
        os._exit(3)
    return kcenter_greedy(torch.randn(50, 4), k)


def fit_images(seed: int = 0, n: int = 10, size: int = 64) -> torch.Tensor:
    """Smooth random images in [0, 1] (N, 3, size, size): every process makes the same ones."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


# Small and quick; a threshold from 2 held-back images (one per process). One image per batch and
# one thread everywhere: oneDNN's convolutions round differently with the batch size and the
# number of threads (by ~1e-5), and a process's blocks start at other images than one process's
# batches, so only then are the features, and so the models, the same to the bit.
FIT_PARAMS = {
    "patchcore": {"backbone": "efficientnet_lite0", "holdout": 0.25, "coreset_ratio": 0.1, "batch_size": 1},
    "padim": {"backbone": "efficientnet_lite0", "holdout": 0.25, "batch_size": 1},
    "gaussian_ad": {"backbone": "efficientnet_lite0", "holdout": 0.25, "batch_size": 1},
    "spade": {"backbone": "efficientnet_lite0", "holdout": 0.25, "k_images": 2, "batch_size": 1},
    "mlfsc": {
        "backbone": "efficientnet_lite0",
        "holdout": 0.25,
        "dictionary_steps": 5,
        "batch_size": 1,
        "patch_size": 4,
        "patch_stride": 1,
        "cutoff": 0,
    },  # small: a 64 px image has an 8 x 8 grid
    "mlfsc_streamed": {"backbone": "efficientnet_lite0", "holdout": 0, "dictionary_fit": "streamed_omp"},
}


# For native-resolution (tiled) prediction: fitted on the images as they are.
NATIVE_PATCHCORE = {**FIT_PARAMS["patchcore"], "resize": None, "crop": None}


def fitted_state(method: str, model) -> dict:
    """What the fit comparison looks at: the learned tensors, the threshold, and scores."""
    tensors, values, _ = model._learned_state()
    prediction = model.predict(fit_images(seed=1, n=4))
    return {
        "tensors": tensors,
        "values": values,
        "threshold": model.threshold_,
        "n": model.n_train_images_,
        "scores": prediction.scores,
        "maps": prediction.maps,
    }


def fit(rank: int, size: int, methods: list) -> dict:
    import fastad

    out = {}
    for method in methods:
        model = fastad.get_method(method.removesuffix("_streamed"))(**FIT_PARAMS[method])
        try:
            model.fit(fit_images())
        except ValueError as exc:
            out[method] = {"refused": str(exc)}
            continue
        out[method] = fitted_state(method, model)
    return out


def fit_dies(rank: int, size: int, model_path: str) -> object:
    """As ``fastad fit`` does under torchrun (fit, barrier, rank 0 saves), with rank 1 leaving
    in the middle of fitting: rank 0 must fail and write nothing."""
    import fastad
    from fastad import distributed
    from fastad.methods import patchcore

    if rank == 1:
        patchcore.PatchCore._fit_patches = lambda self, chunks: os._exit(3)
    model = fastad.PatchCore(**FIT_PARAMS["patchcore"]).fit(fit_images())
    distributed.barrier()
    if rank == 0:
        model.save(model_path)
    return "saved"


def knn_shards(rank: int, size: int, cases: list) -> list:
    """Each case: a bank split in consecutive blocks of the given sizes (some empty), searched by
    every rank for the same queries; also the rows read back through the split."""
    from fastad import ops
    from fastad.distributed import CommunicationLog, knn_across_shards, rows_across_shards

    results = []
    for seed, n, m, d, k, kind, blocks in cases:
        bank = kcenter_data(seed, n, d, kind)
        query = kcenter_data(seed + 1, m, d, kind)
        edges = [0, *torch.tensor(blocks).cumsum(0).tolist()]
        shard, rows = bank[edges[rank] : edges[rank + 1]], torch.arange(edges[rank], edges[rank + 1])
        log = CommunicationLog()
        prepared = ops.knn_prepare(shard) if shard.shape[0] else None
        distances, indices = knn_across_shards(query, shard, rows, k, prepared=prepared, log=log)
        read = rows_across_shards(indices, shard, rows)
        results.append((distances, indices, read, log.bytes_received))
    return results


def devices(rank: int, size: int) -> list:
    """What process_device makes of a few devices with torchrun's LOCAL_RANK set."""
    from fastad.distributed import process_device

    os.environ["LOCAL_RANK"] = str(rank)
    return [process_device(d) for d in ("cuda", "cuda:1", "cpu", None)]


def environment_group(rank: int, size: int, port: int) -> list:
    """leave_environment_group leaves the harness's group alone, then tears down the group that
    init_from_environment joins from torchrun's variables, once both ranks have used it."""
    from fastad import distributed

    distributed.leave_environment_group()
    caller_group_kept = dist.is_initialized()
    dist.destroy_process_group()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    joined = distributed.init_from_environment(timeout_s=60)
    total = distributed.all_reduce_sum(rank + 1)
    distributed.leave_environment_group()
    return [caller_group_kept, joined, total, dist.is_initialized()]


def fit_split(rank: int, size: int, model_path: str) -> dict:
    """PatchCore with its bank left split across the processes: what each holds, its scores,
    its saved parts, and the scores of the model loaded back inside the group."""
    import fastad

    model = fastad.PatchCore(**FIT_PARAMS["patchcore"], shard_bank=True).fit(fit_images())
    out = fitted_state("patchcore", model)
    out["bank_size"] = model.bank_size_
    model.save(model_path)
    loaded = fastad.AnomalyModel.load(model_path)
    out["loaded_rows"] = loaded.bank_rows_
    out["loaded_scores"] = loaded.predict(fit_images(seed=1, n=4)).scores
    dist.destroy_process_group()
    try:
        model.predict(fit_images(seed=1, n=1))
    except RuntimeError as exc:
        out["outside_group"] = str(exc)
    return out


def tiled_scene(seed: int, height: int, width: int) -> torch.Tensor:
    """A smooth random (3, H, W) image in [0, 1] with a bright rectangle in it."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 16 + 1, width // 16 + 1, generator=gen)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    image[:, height // 3 : height // 3 + 24, width // 2 : width // 2 + 30] = 0.95
    return image


def predict_tiled(model, image: torch.Tensor, tile: int) -> dict:
    from fastad.highres import predict_large

    result = predict_large(model, image, tile=tile, band=48)
    return {"patch_map": result.patch_map, "map": result.map, "score": result.score}


def tiled(rank: int, size: int, model_paths: list, seed: int, height: int, width: int, tile: int) -> dict:
    """One image scored tile by tile by all the processes together: by each saved (whole) model,
    whose tiles are divided among the processes, and by a PatchCore fitted here with its bank
    split across them, which every process searches for every tile."""
    import fastad

    image = tiled_scene(seed, height, width)
    out = {path: predict_tiled(fastad.AnomalyModel.load(path), image, tile) for path in model_paths}
    split = fastad.PatchCore(**NATIVE_PATCHCORE, shard_bank=True).fit(fit_images())
    out["split"] = predict_tiled(split, image, tile)
    out["fit_large"] = fit_large_states(tile)
    return out


def fit_large_states(tile: int) -> dict:
    """PatchCore and SPADE fitted tile by tile (fastad.highres.fit_large) on the same images:
    under a group each process reads its block of them."""
    import fastad
    from fastad.highres import fit_large

    images = [tiled_scene(20 + i, 96, 128 + 32 * (i % 2)) for i in range(5)]  # two sizes: unequal key counts
    out = {}
    for name, model in (
        ("patchcore", fastad.PatchCore(**NATIVE_PATCHCORE)),
        ("spade", fastad.SPADE(backbone="efficientnet_lite0", resize=None, crop=None, k_images=2)),
        (
            "mlfsc",
            fastad.MLFSC(
                backbone="efficientnet_lite0",
                resize=None,
                crop=None,
                dictionary_steps=5,
                patch_size=4,
                patch_stride=1,
                cutoff=1,
            ),
        ),
    ):
        fit_large(model, images[::2] if name == "spade" else images, tile=tile)  # SPADE: one size
        out[name] = {**model._learned_state()[0], "n": model.n_train_images_}
    return out


BODIES = {
    "kcenter": kcenter,
    "gaussian": gaussian,
    "dies": dies,
    "fit": fit,
    "fit_dies": fit_dies,
    "knn_shards": knn_shards,
    "devices": devices,
    "environment_group": environment_group,
    "fit_split": fit_split,
    "tiled": tiled,
}

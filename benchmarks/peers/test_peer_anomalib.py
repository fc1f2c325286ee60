"""Smoke test of the fastad-vs-anomalib comparisons (benchmarks/peers/vs_anomalib.py), PatchCore
and PaDiM.

Skips at once, with the reason, when anomalib's separate interpreter is absent
(``FASTAD_ANOMALIB_PYTHON``, default /work/anomalib-venv/bin/python) or the magnetic-tile data is
missing. Otherwise it runs the driver on a handful of images (10-15 s a method on 2 cores) and
checks that both sides saw identical inputs and layers, that anomalib's metric classes and
fastad.metrics agree on anomalib's own scores and maps, and what each fitted model holds; for
PaDiM, where both libraries compute the same estimator on the same features, that their scores
and maps agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "vs_anomalib.py"
DATA = HERE.parents[1].parent / "shared" / "data" / "magnetic_tile"
ANOMALIB_PYTHON = Path(os.environ.get("FASTAD_ANOMALIB_PYTHON", "/work/anomalib-venv/bin/python"))
METHODS = ("patchcore", "padim")
# PaDiM at a smaller input (a 28 x 28 grid of Gaussians instead of 56 x 56) to keep the test short:
# anomalib's fit loops over the positions in Python.
PADIM_CROP = 112
SIZE_ARGS = {"patchcore": [], "padim": ["--resize", "128", "--crop", str(PADIM_CROP)]}


@pytest.mark.parametrize("method", METHODS)
def test_driver_skips_cleanly_without_anomalib(tmp_path, method):
    missing = tmp_path / "no-such-python"
    done = subprocess.run(
        [sys.executable, str(DRIVER), "--method", method, "--anomalib-python", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("skipped: anomalib not installed at"), done.stdout
    assert str(missing) in done.stdout


def test_driver_rejects_an_unknown_method():
    done = subprocess.run(
        [sys.executable, str(DRIVER), "--method", "spade"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "--method" in done.stderr and "spade" in done.stderr


def check_patchcore(result: dict) -> None:
    for side in ("fastad", "anomalib"):
        assert abs(result[side]["bank_size"] - 0.1 * result[side]["n_patches"]) <= 1  # coreset ratio 0.1
        assert result[side]["embedding_dim"] == 40 + 112


def check_padim(result: dict) -> None:
    for side in ("fastad", "anomalib"):
        assert result[side]["embedding_dim"] == result[side]["n_features_original"] == 24 + 40 + 112
        assert result[side]["all_channels_kept"] is True
        assert result[side]["positions"] == (PADIM_CROP // 4) ** 2
    # The same Gaussians of the same features: only float32 rounding, fastad's float64 statistics
    # and anomalib's extra 1e-5 ridge separate them.
    check = result["cross_check"]
    assert check["image_score_pearson"] > 0.999
    assert check["map_pearson"] > 0.999
    assert check["image_score_median_relative_difference"] < 1e-2
    for name in ("image_auroc", "pixel_auroc", "aupro"):
        assert result["fastad"][name] == pytest.approx(result["anomalib"][name], abs=2e-2), name


@pytest.mark.parametrize("method", METHODS)
def test_method_beside_anomalib_on_a_few_images(tmp_path, method):
    if not ANOMALIB_PYTHON.is_file():
        pytest.skip(f"anomalib's interpreter not found at {ANOMALIB_PYTHON} (see benchmarks/peers/README.md)")
    if not (DATA / "train").is_dir():
        pytest.skip(f"magnetic-tile data not found at {DATA}")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            str(DRIVER),
            "--method",
            method,
            "--anomalib-python",
            str(ANOMALIB_PYTHON),
            "--data",
            str(DATA),
            "--train-limit",
            "4",
            "--limit",
            "10",
            "--json-out",
            str(report),
            *SIZE_ARGS[method],
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    if done.stdout.startswith("skipped:"):
        pytest.skip(done.stdout.strip())
    result = json.loads(report.read_text())
    assert result["method"] == method
    check = result["cross_check"]
    assert check["masks_identical"]
    assert check["max_abs_input_difference"] < 1e-5
    # Two independent implementations of each metric on the same numbers.
    for name in ("image_auroc", "pixel_auroc", "aupro"):
        assert result["anomalib"][name] == pytest.approx(check["fastad_metrics_on_anomalib_output"][name], abs=2e-3), (
            name
        )
    for side in ("fastad", "anomalib"):
        assert result[side]["fit_s"] > 0 and result[side]["latency_ms"] > 0 and result[side]["throughput_img_s"] > 0
    {"patchcore": check_patchcore, "padim": check_padim}[method](result)

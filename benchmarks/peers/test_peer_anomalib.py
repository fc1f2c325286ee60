"""Smoke test of the fastad-vs-anomalib PatchCore comparison (benchmarks/peers/).

Skips at once, with the reason, when anomalib's separate interpreter is absent
(``FASTAD_ANOMALIB_PYTHON``, default /work/anomalib-venv/bin/python) or the magnetic-tile data is
missing. Otherwise it runs the driver on a handful of images (about half a minute on 2 cores)
and checks that both sides saw identical inputs and that anomalib's metric classes and
fastad.metrics agree on anomalib's own scores and maps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "patchcore_vs_anomalib.py"
DATA = HERE.parents[1].parent / "shared" / "data" / "magnetic_tile"
ANOMALIB_PYTHON = Path(os.environ.get("FASTAD_ANOMALIB_PYTHON", "/work/anomalib-venv/bin/python"))


def test_driver_skips_cleanly_without_anomalib(tmp_path):
    missing = tmp_path / "no-such-python"
    done = subprocess.run(
        [sys.executable, str(DRIVER), "--anomalib-python", str(missing)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("skipped: anomalib not installed at"), done.stdout
    assert str(missing) in done.stdout


def test_patchcore_beside_anomalib_on_a_few_images(tmp_path):
    if not ANOMALIB_PYTHON.is_file():
        pytest.skip(f"anomalib's interpreter not found at {ANOMALIB_PYTHON} (see benchmarks/peers/README.md)")
    if not (DATA / "train").is_dir():
        pytest.skip(f"magnetic-tile data not found at {DATA}")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(DRIVER), "--anomalib-python", str(ANOMALIB_PYTHON), "--data", str(DATA),
         "--train-limit", "4", "--limit", "10", "--json-out", str(report)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    if done.stdout.startswith("skipped:"):
        pytest.skip(done.stdout.strip())
    result = json.loads(report.read_text())
    check = result["cross_check"]
    assert check["masks_identical"]
    assert check["max_abs_input_difference"] < 1e-5
    # Two independent implementations of each metric on the same numbers.
    for name in ("image_auroc", "pixel_auroc", "aupro"):
        assert result["anomalib"][name] == pytest.approx(check["fastad_metrics_on_anomalib_output"][name], abs=2e-3), name
    for side in ("fastad", "anomalib"):
        assert abs(result[side]["bank_size"] - 0.1 * result[side]["n_patches"]) <= 1  # coreset ratio 0.1
        assert result[side]["fit_s"] > 0 and result[side]["latency_ms"] > 0

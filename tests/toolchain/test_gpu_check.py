"""The one-call GPU check (benchmarks/gpu_check.sh) and its parts, on the CPU: the summary reads
what the steps write and judges each figure against its target, and the sanitizer driver and the
latency script run. What needs a GPU (the build with CUDA, the CUDA tests and benchmarks) runs
only on a lent GPU machine."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import gpu_latency, gpu_sanitize, gpu_summary
from benchmarks import test_bench_kcenter as kcenter
from benchmarks import test_bench_knn as knn
from benchmarks import test_bench_mahalanobis as mahalanobis
from benchmarks import test_bench_omp as omp

from ..conftest import require_lite0

ROOT = Path(__file__).resolve().parents[2]


def _bench_file(path: Path, rows: list[tuple[str, str, float, dict]]) -> None:
    """A pytest-benchmark JSON file with (group, contender, best seconds, extra_info) rows."""
    benchmarks = [
        {"group": group, "name": f"test[{name}]", "stats": {"min": best}, "extra_info": {"contender": name, **extra}}
        for group, name, best, extra in rows
    ]
    path.write_text(json.dumps({"benchmarks": benchmarks}))


def test_the_summary_judges_each_figure_against_its_target(tmp_path):
    (tmp_path / "device.txt").write_text("NVIDIA H200, 143771 MiB\n")
    _bench_file(
        tmp_path / "bench-kcenter.json",
        [
            (kcenter.cuda_group(200_000, 2_000), "fastad.ops.kcenter_greedy", 0.010, {}),
            (kcenter.cuda_group(200_000, 2_000), "anomalib KCenterGreedy loop", 0.356, {}),  # 35.6x: met
            (kcenter.cuda_group(1_000_000, 10_000), "fastad.ops.kcenter_greedy", 2.716, {}),
            (kcenter.cuda_group(1_000_000, 10_000), "anomalib KCenterGreedy loop", 6.584, {}),  # 2.4x: not met
        ],
    )
    group = knn.cuda_group(6272, 65536, 384, 9)
    tf32 = {"gflops": 100.0, "gemm_gflops_at_this_precision": 400.0}  # 25 % of the TF32 rate
    _bench_file(tmp_path / "bench-knn.json", [(group, "fastad.ops.knn (TF32 matmul)", 0.003, tf32)])
    (tmp_path / "bench-omp.json").write_text('{"benchmarks": [')  # cut off mid-write: passed over
    (tmp_path / "latency.jsonl").write_text(
        json.dumps(
            {
                "method": "patchcore",
                "backbone": "efficientnet_lite0",
                "weights": "imagenet",
                "latency_ms": 1.5,
                "latency_p90_ms": 1.7,
                "latency_from_host_ms": 1.9,
                "host_syncs_per_predict": 2,
                "sync_sites": ["patchcore.py:300"],
            }
        )
        + "\n"
        + json.dumps({"method": "padim", "backbone": "wide_resnet50_2", "skipped": "no ImageNet weights"})
        + "\n"
    )
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2"/></testsuites>'
    )
    (tmp_path / "sanitizer.log").write_text(
        "gpu_sanitize: 36 op calls on cuda ran and agree with the CPU kernels\n========= ERROR SUMMARY: 0 errors\n"
    )

    assert gpu_summary.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert text.startswith("# GPU check: NVIDIA H200")
    assert "7 passed, 1 failed, 0 errors, 2 skipped" in text
    assert "ERROR SUMMARY: 0 errors; driver finished" in text
    small, large = "k-center 200k x 128, k 2000, full path (default)", "k-center 1M x 128, k 10000, full path (default)"
    assert "**35.60x**" in lines[small] and lines[small].endswith("| met |")
    assert "**2.42x**" in lines[large] and "**not met**" in lines[large]
    assert lines["k-center 200k x 128, k 2000, pruned path"].endswith("| not measured |")
    assert "**25%** of TF32 GEMM" in lines["kNN 6272 x 65536 x 384, exact with TF32 allowed"]
    assert "**not met**" in lines["kNN 6272 x 65536 x 384, exact with TF32 allowed"]
    for missing in (
        "Mahalanobis B32 P3136 D550, L row-major",
        "OMP 20000 x 512 x 64, s 5, warp path (vs the CPU kernel on every core)",
    ):
        assert lines[missing].endswith("| not measured |"), missing
    lite0 = lines["patchcore batch-1 predict, efficientnet_lite0 (imagenet)"]
    assert "**1.50 ms**" in lite0 and "patchcore.py:300" in lite0 and lite0.endswith("| met |")
    assert "skipped: no ImageNet weights" in lines["padim batch-1 predict, wide_resnet50_2 (no weights)"]


def test_the_summary_of_a_check_that_ran_nothing_lists_every_figure_as_not_measured(tmp_path):
    assert gpu_summary.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "CUDA tests: not run" in text and "compute-sanitizer memcheck: not run" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 13 and all(row.endswith("| not measured |") for row in rows)
    assert gpu_summary.main([str(tmp_path / "missing")]) == 2


def test_the_benchmark_groups_the_summary_reads_are_the_benchmarks_own():
    """The summary looks groups up by the benchmark files' own cuda_group(); each of its targets
    names a case those files run."""
    speed, tf32 = gpu_summary._targets()
    groups = {t.group for t in speed} | {group for _, group, _ in tf32}
    run = (
        {kcenter.cuda_group(n, k) for n, k in kcenter.CUDA_CASES}
        | {knn.cuda_group(*shape) for shape in knn.CUDA_SHAPES}
        | {mahalanobis.cuda_group(case) for case in (mahalanobis.CASES[0], mahalanobis.CASES[1], mahalanobis.CASES[3])}
        | {omp.cuda_group(case) for case in omp.CASES}
    )
    assert groups <= run, groups - run


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_check_script_parses_and_demands_an_output_folder(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "set OUT to the folder for the results" in done.stderr


def test_the_sanitizer_driver_runs_every_op():
    assert gpu_sanitize.main(["--device", "cpu"]) == 0


def test_the_latency_script_times_a_model_and_skips_a_backbone_without_weights(monkeypatch, tmp_path, capsys):
    require_lite0()
    monkeypatch.setattr(gpu_latency, "TRAIN_IMAGES", 3)
    monkeypatch.setattr(gpu_latency, "SIDE", 64)
    out = tmp_path / "latency.jsonl"
    argv = ["--device", "cpu", "--methods", "patchcore", "--backbones", "efficientnet_lite0", "--repeats", "2"]
    assert gpu_latency.main([*argv, "--json", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["weights"] == "imagenet" and row["latency_ms"] > 0 and row["latency_p90_ms"] >= row["latency_ms"]
    assert row["host_syncs_per_predict"] is None  # a CPU run has no device to wait for

    from fastad.features import available_backbones

    if available_backbones()["wide_resnet50_2"]["available"]:
        pytest.skip("Wide-ResNet-50-2 weights are installed here: no skip to check")
    skipped = gpu_latency.time_one("padim", "wide_resnet50_2", "cpu", 1, random_weights=False)
    assert skipped["skipped"].startswith("no ImageNet weights for wide_resnet50_2: ")
    assert "--random-weights" in skipped["skipped"]

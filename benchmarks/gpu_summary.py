"""The summary table of one GPU check (``benchmarks/gpu_check.sh``): each figure the GPU issue
asks for, measured against its target, from the files the check wrote.

    python -m benchmarks.gpu_summary DIR      # reads DIR/bench-*.json, latency.jsonl, tests.xml,
                                              # sanitizer.log, device.txt; writes DIR/summary.md

A figure whose run is missing (a step that ran out of time, a benchmark that failed) is listed as
"not measured" rather than left out, so the table always has every row.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SpeedTarget:
    """A ratio (contender's best time / fastad's) of one benchmark group, and its target."""

    what: str
    group: str
    fastad: str
    contender: str
    at_least: float


def _targets() -> tuple[list[SpeedTarget], list[tuple[str, str, float]]]:
    """The issue's speed targets, with each benchmark's group as the benchmark files name it."""
    from . import test_bench_kcenter as kcenter
    from . import test_bench_knn as knn
    from . import test_bench_mahalanobis as mahalanobis
    from . import test_bench_omp as omp

    per_patch, wrn = mahalanobis.CASES[0], mahalanobis.CASES[3]
    speed = [
        SpeedTarget(
            f"k-center {size}, {path}",
            kcenter.cuda_group(n, k),
            fastad_name,
            "anomalib KCenterGreedy loop",
            20.0,
        )
        for n, k, size in ((200_000, 2_000, "200k x 128, k 2000"), (1_000_000, 10_000, "1M x 128, k 10000"))
        for fastad_name, path in (
            ("fastad.ops.kcenter_greedy", "full path (default)"),
            ("fastad.ops.kcenter_greedy (pruned path)", "pruned path"),
        )
    ]
    for case, label in ((per_patch, "D100"), (wrn, "D550")):
        for fastad_name, layout in (
            ("fastad.ops.mahalanobis", "column-major"),
            ("fastad.ops.mahalanobis, L row-major", "row-major"),
        ):
            speed.append(
                SpeedTarget(
                    f"Mahalanobis B32 P3136 {label}, L {layout}",
                    mahalanobis.cuda_group(case),
                    fastad_name,
                    "anomalib batched matmul",
                    5.0,
                )
            )
    speed += [
        SpeedTarget(
            "kNN 784 x 7840 x 152, k 9 (one PatchCore image)",
            knn.cuda_group(784, 7840, 152, 9),
            "fastad.ops.knn",
            "chunked matmul + topk",
            2.0,
        ),
    ]
    speed += [
        SpeedTarget(
            f"OMP 20000 x 512 x 64, s 5, {path} (vs the CPU kernel on every core)",
            omp.cuda_group(omp.CASES[0]),
            fastad_name,
            "fastad.ops.omp on the CPU (every core)",
            5.0,
        )
        for fastad_name, path in (
            ("fastad.ops.omp", "thread path (default)"),
            ("fastad.ops.omp (warp path)", "warp path"),
        )
    ]
    tf32 = [  # (what, group, at least this fraction of the TF32 GEMM rate)
        ("kNN 6272 x 65536 x 384, exact with TF32 allowed", knn.cuda_group(6272, 65536, 384, 9), 0.5),
        ("kNN 100k x 1M x 384, exact with TF32 allowed", knn.cuda_group(100_000, 1_000_000, 384, 9), 0.5),
    ]
    return speed, tf32


LATENCY_TARGET_MS = 2.0  # PatchCore and PaDiM batch-1 predict on Lite0


def read_benchmarks(paths: list[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    """{(group, contender): {"min": seconds, **extra_info}} from pytest-benchmark's JSON files
    (one per benchmark file; an unreadable one, e.g. cut off mid-write, is passed over)."""
    out = {}
    for path in paths:
        try:
            benchmarks = json.loads(path.read_text()).get("benchmarks", [])
        except (OSError, json.JSONDecodeError):
            continue
        for bench in benchmarks:
            extra = bench.get("extra_info", {})
            name = extra.get("contender")
            if name and bench.get("group"):
                out[(bench["group"], name)] = {"min": bench["stats"]["min"], **extra}
    return out


def read_latency(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_tests(path: Path) -> str:
    """ "P passed, F failed, E errors, S skipped" of a JUnit XML file, or why there is none."""
    if not path.is_file():
        return "not run (no tests.xml)"
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return f"unreadable tests.xml ({exc}): the run was probably cut off"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return f"{passed} passed, {total['failures']} failed, {total['errors']} errors, {total['skipped']} skipped"


def read_sanitizer(path: Path) -> str:
    if not path.is_file():
        return "not run"
    text = path.read_text(errors="replace")
    summary = [line for line in text.splitlines() if "ERROR SUMMARY" in line]
    done = "agree with the CPU kernels" in text
    return (summary[-1].strip("= ").strip() if summary else "no ERROR SUMMARY line") + (
        "; driver finished" if done else "; driver did not finish"
    )


def _verdict(value: float | None, ok: bool) -> str:
    return "not measured" if value is None else ("met" if ok else "**not met**")


def speed_rows(bench: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    rows = []
    speed_targets, tf32_targets = _targets()
    for t in speed_targets:
        ours, theirs = bench.get((t.group, t.fastad)), bench.get((t.group, t.contender))
        ratio = theirs["min"] / ours["min"] if ours and theirs else None
        shown = (
            f"{ours['min'] * 1e3:.3g} ms vs {theirs['min'] * 1e3:.3g} ms: **{ratio:.2f}x**" if ratio else "not measured"
        )
        rows.append(
            f"| {t.what} | {shown} | >= {t.at_least:g}x | {_verdict(ratio, bool(ratio and ratio >= t.at_least))} |"
        )
    for what, group, fraction in tf32_targets:
        ours = bench.get((group, "fastad.ops.knn (TF32 matmul)"))
        share = None
        if ours and ours.get("gflops") and ours.get("gemm_gflops_at_this_precision"):
            share = ours["gflops"] / ours["gemm_gflops_at_this_precision"]
        shown = (
            f"{ours['min'] * 1e3:.3g} ms, {ours['gflops']:.0f} GFLOP/s = **{share:.0%}** of TF32 GEMM"
            if share is not None
            else "not measured"
        )
        rows.append(f"| {what} | {shown} | >= {fraction:.0%} | {_verdict(share, bool(share and share >= fraction))} |")
    return rows


def latency_rows(latency: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in latency:
        what = f"{r['method']} batch-1 predict, {r['backbone']} ({r.get('weights', 'no weights')})"
        if "skipped" in r:
            rows.append(f"| {what} | skipped: {r['skipped']} | | |")
            continue
        target = r["backbone"] == "efficientnet_lite0"
        shown = (
            f"median **{r['latency_ms']:.2f} ms** (p90 {r['latency_p90_ms']:.2f}; from host memory "
            f"{r['latency_from_host_ms']:.2f}); {r['host_syncs_per_predict']} host syncs"
            + (f" ({', '.join(r['sync_sites'])})" if r.get("sync_sites") else "")
        )
        verdict = _verdict(r["latency_ms"], r["latency_ms"] <= LATENCY_TARGET_MS) if target else "reported"
        rows.append(f"| {what} | {shown} | {'<= 2 ms' if target else ''} | {verdict} |")
    return rows


def summarize(folder: Path) -> str:
    facts = (folder / "device.txt").read_text().strip().splitlines() if (folder / "device.txt").is_file() else []
    bench = read_benchmarks(sorted(folder.glob("bench-*.json")))
    lines = [
        f"# GPU check: {facts[0] if facts else 'unknown device'}",
        "",
        *(f"- {fact}" for fact in facts[1:]),
        f"- CUDA tests: {read_tests(folder / 'tests.xml')}",
        f"- compute-sanitizer memcheck: {read_sanitizer(folder / 'sanitizer.log')}",
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
        *speed_rows(bench),
        *latency_rows(read_latency(folder / "latency.jsonl")),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m benchmarks.gpu_summary DIR (the folder the GPU check wrote)", file=sys.stderr)
        return 2
    folder = Path(args[0])
    text = summarize(folder)
    (folder / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark harness: every kernel against its baselines in one run, with ratios and rates.

Each benchmark records (group, name, best time, floating-point work); the terminal summary
prints, per group, each contender's best time, its GFLOP/s, the fraction of this machine's
measured single-precision GEMM rate, and how many times slower than fastad it is.
"""

from __future__ import annotations

import os
import platform
import time
from collections import defaultdict

import pytest
import torch

_RESULTS: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
_GEMM_RATE: dict[str, float] = {}


def sgemm_rate(device: str = "cpu", precision: str = "highest") -> float:
    """Best float32 GEMM rate (FLOP/s) of torch.mm here: the practical ceiling for any kernel
    whose work is a matrix product. ``precision`` is torch's float32 matmul precision during the
    measurement ("high" lets a GPU use TF32); the summary's fractions use the "highest" rate."""
    key = device if precision == "highest" else f"{device} ({precision})"
    if key in _GEMM_RATE:
        return _GEMM_RATE[key]
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        best = float("inf")
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_float32_matmul_precision(before)
    _GEMM_RATE[key] = 2 * n**3 / best
    return _GEMM_RATE[key]


def with_environment(fn, name: str, value: str):
    """``fn`` run with the environment variable ``name`` set to ``value``, then restored: how the
    benchmarks force one kernel path (FASTAD_*_CPU_ISA, FASTAD_*_CUDA_PATH), which the ops read on
    every call."""

    def run(*args):
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn(*args)
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before

    return run


def cuda_synced(fn):
    """``fn`` followed by torch.cuda.synchronize(): GPU work is asynchronous, so a timer around
    the call alone would measure the launch, not the kernel."""

    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


@pytest.fixture
def record():
    """record(benchmark, group, name, flops): remember the best time for the summary (flops 0
    for work that is not counted in floating-point operations)."""

    def _record(benchmark, group: str, name: str, flops: float) -> None:
        best = benchmark.stats.stats.min
        _RESULTS[group].append((name, best, flops))
        benchmark.extra_info["contender"] = name  # for readers of --benchmark-json (gpu_summary)
        if flops:
            benchmark.extra_info["gflops"] = flops / best / 1e9

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("fastad benchmark summary (best of rounds)")
    tr.write_line(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    for device, rate in _GEMM_RATE.items():
        tr.write_line(f"torch.mm float32 rate on {device}: {rate / 1e9:.1f} GFLOP/s")
    for group, rows in _RESULTS.items():
        device = "cuda" if "cuda" in group else "cpu"
        rate = _GEMM_RATE.get(device)
        ours = next((t for n, t, _ in rows if n.startswith("fastad") and "(" not in n), None)
        tr.write_line(f"\n{group}")
        for name, best, flops in sorted(rows, key=lambda r: r[1]):
            rel = f"{best / ours:5.2f}x fastad's time" if ours else ""
            if flops:  # a kernel whose work is counted in floating-point operations
                gf = flops / best / 1e9
                frac = f"{gf * 1e9 / rate:6.1%} of mm" if rate else ""
                tr.write_line(f"  {name:34s} {best * 1e3:10.1f} ms {gf:9.1f} GFLOP/s {frac}  {rel}")
            else:
                tr.write_line(f"  {name:34s} {best * 1e3:10.1f} ms  {rel}")

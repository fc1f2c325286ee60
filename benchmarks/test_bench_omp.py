"""Orthogonal Matching Pursuit: fastad.ops.omp against scikit-learn's orthogonal_mp_gram and its
SparseCoder(transform_algorithm="omp") (which forms its own Gram and correlations).

Two shapes: the issue's acceptance case, one dictionary of K = 512 atoms (d = 64) coding
M = 20,000 signals with s = 5 atoms each, and MLF-SC's, G = 896 groups (one per patch position)
of M = 121 signals over their own K = 5 atoms, d = 64, s = 3. fastad's time includes computing
Gram = D D^T and Xy = D x; scikit-learn is given both precomputed (float32, the data's dtype), as
its API wants, so its time is the pursuit alone. At MLF-SC's shape scikit-learn loops over groups;
it is timed on the first SKLEARN_GROUPS groups and the time scaled by G / SKLEARN_GROUPS (its
per-group cost does not depend on the values), which the summary's row name says.
Floating-point work counted: the Xy product, 2 G M K d. On a GPU, fastad's CUDA kernel is timed
against its own CPU kernel using every core of the machine (the fastest CPU way there is).
Run with `pytest benchmarks/test_bench_omp.py --benchmark-only`.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastad

from .baselines import sklearn_omp_gram, sklearn_sparse_coder_omp
from .conftest import cuda_synced, with_environment

CUDA_OK = fastad.build_info()["cuda"] and torch.cuda.is_available()

SKLEARN_GROUPS = 64
# (name, G, M, K, d, s)
CASES = [
    ("one dictionary", 1, 20_000, 512, 64, 5),
    ("MLF-SC per-position dictionaries", 896, 121, 5, 64, 3),
]


def make_inputs(g: int, m: int, k: int, d: int):
    gen = torch.Generator().manual_seed(0)
    dictionary = torch.randn(g, k, d, generator=gen)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    return torch.randn(g, m, d, generator=gen), dictionary


@pytest.mark.parametrize("case", CASES, ids=[c[0].replace(" ", "-") for c in CASES])
@pytest.mark.parametrize(
    "contender", ["fastad.ops.omp", "scikit-learn orthogonal_mp_gram", "scikit-learn SparseCoder omp"]
)
def test_omp_cpu(benchmark, record, contender, case):
    from .conftest import sgemm_rate

    name, g, m, k, d, s = case
    sgemm_rate("cpu")
    x, dictionary = make_inputs(g, m, k, d)
    benchmark.group = f"omp cpu {name} G={g} M={m} K={k} d={d} s={s}"
    flops = 2.0 * g * m * k * d
    if contender == "fastad.ops.omp":
        benchmark.pedantic(fastad.ops.omp, args=(x, dictionary, s), rounds=5, iterations=1, warmup_rounds=1)
        record(benchmark, benchmark.group, contender, flops)
        return
    groups = min(g, SKLEARN_GROUPS)
    if contender == "scikit-learn SparseCoder omp":
        args = (x.numpy(), dictionary.numpy(), s, groups)
        benchmark.pedantic(sklearn_sparse_coder_omp, args=args, rounds=1 if g == 1 else 3, iterations=1)
    else:
        grams = (dictionary @ dictionary.mT).numpy()
        xys = (dictionary @ x.mT).numpy()  # (G, K, M)
        benchmark.pedantic(sklearn_omp_gram, args=(grams, xys, s, groups), rounds=1 if g == 1 else 3, iterations=1)
    if groups < g:  # scale the time of the groups it ran to all of them
        benchmark.stats.stats.data[:] = [t * g / groups for t in benchmark.stats.stats.data]
        contender = f"{contender} (x{g / groups:.0f} of {groups} groups)"
    record(benchmark, benchmark.group, contender, flops)


def _on_every_core(fn):
    """``fn`` run with torch's intra-op threads set to every core of the machine, then restored."""

    def run(*args):
        before = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or before)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(before)

    return run


def cuda_group(case: tuple[str, int, int, int, int, int]) -> str:
    """The summary group of a CUDA case (benchmarks/gpu_summary.py reads it)."""
    name, g, m, k, d, s = case
    return f"omp cuda {name} G={g} M={m} K={k} d={d} s={s}"


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and fastad's CUDA kernels")
@pytest.mark.parametrize("case", CASES, ids=[c[0].replace(" ", "-") for c in CASES])
@pytest.mark.parametrize(
    "contender", ["fastad.ops.omp", "fastad.ops.omp (warp path)", "fastad.ops.omp on the CPU (every core)"]
)
def test_omp_cuda(benchmark, record, contender, case):
    name, g, m, k, d, s = case
    x, dictionary = make_inputs(g, m, k, d)
    if contender == "fastad.ops.omp":
        x, dictionary = x.cuda(), dictionary.cuda()
        fn = cuda_synced(fastad.ops.omp)
    elif contender == "fastad.ops.omp (warp path)":  # opt-in until a GPU run verifies it
        x, dictionary = x.cuda(), dictionary.cuda()
        fn = cuda_synced(with_environment(fastad.ops.omp, "FASTAD_OMP_CUDA_PATH", "warp"))
    else:
        fn = _on_every_core(fastad.ops.omp)
    benchmark.group = cuda_group(case)
    benchmark.pedantic(fn, args=(x, dictionary, s), rounds=5, iterations=1, warmup_rounds=1)
    record(benchmark, benchmark.group, contender, 2.0 * g * m * k * d)

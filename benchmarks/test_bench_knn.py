"""kNN: fastad.ops.knn against torch.cdist + topk, chunked matmul + topk, and faiss IndexFlatL2.

Run with `make bench` (or `pytest benchmarks -k knn --benchmark-only`). Inputs are standard
normal ("random") or clustered, non-negative features like a CNN's ("clustered").
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fastad

from .baselines import cdist_topk, chunked_matmul_topk, faiss_flat_l2
from .conftest import cuda_synced, with_environment

HAS_FAISS = importlib.util.find_spec("faiss") is not None
CUDA_OK = fastad.build_info()["cuda"] and torch.cuda.is_available()

CPU_SHAPES = [
    # (M, N, D, k): the acceptance shape (PatchCore-like: 8 images of 28x28 patches vs a bank)
    (6272, 65536, 384, 9),
    # one image's patches against a wide-feature bank (inline inspection latency)
    (784, 16384, 1536, 1),
    # one image's EfficientNet-Lite0 patches against a magnetic-tile-sized PatchCore bank
    (784, 7840, 152, 1),
    # SPADE's pixel search at its first Lite0 layer (stride 4, 24 channels): one image's 56 x 56
    # positions against every position of its 50 nearest training images
    (3136, 156800, 24, 1),
]


def clustered(n, d, gen):
    centres = 2.0 * torch.randn(512, d, generator=gen)
    mix = torch.randn(d, d, generator=gen) / d**0.5
    pick = torch.randint(0, 512, (n,), generator=gen)
    return torch.relu(centres[pick] @ mix + 0.5 * torch.randn(n, d, generator=gen)).contiguous()


def make_inputs(kind, m, n, d, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    if kind == "random":
        q, b = torch.randn(m, d, generator=gen), torch.randn(n, d, generator=gen)
    else:
        q, b = clustered(m, d, gen), clustered(n, d, gen)
    return q.to(device), b.to(device)


def fastad_cpu_path(path):
    """fastad.ops.knn with its CPU path forced (FASTAD_KNN_CPU_ISA), to show each kernel."""
    return with_environment(fastad.ops.knn, "FASTAD_KNN_CPU_ISA", path)


PREPARED = "fastad.ops.knn (prepared bank)"

CONTENDERS = {
    "fastad.ops.knn": lambda q, b, k: fastad.ops.knn(q, b, k),
    PREPARED: None,  # knn_prepare(bank) once, outside the timing (a model's bank)
    "fastad.ops.knn (VNNI screen)": fastad_cpu_path("vnni"),
    "fastad.ops.knn (AVX2 screen)": fastad_cpu_path("avx2"),
    "fastad.ops.knn (float32 GEMM)": fastad_cpu_path("portable"),
    "faiss IndexFlatL2": None,  # the index built once, outside the timing
    "torch.cdist + topk": cdist_topk,
    "chunked matmul + topk": chunked_matmul_topk,
}


@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("m,n,d,k", CPU_SHAPES, ids=[f"M{m}-N{n}-D{d}-k{k}" for m, n, d, k in CPU_SHAPES])
@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_knn_cpu(benchmark, record, contender, m, n, d, k, kind):
    from .conftest import sgemm_rate

    if contender.startswith("faiss") and not HAS_FAISS:
        pytest.skip("faiss-cpu is not installed (pip install faiss-cpu)")
    if kind == "clustered" and (m, n) == CPU_SHAPES[1][:2]:
        pytest.skip("clustered data at the acceptance, PatchCore and SPADE shapes only")
    if contender == "torch.cdist + topk" and m * n > 2**28:
        pytest.skip("torch.cdist would materialise the whole M x N matrix (2 GB); chunked matmul stands in")
    if "screen" in contender and kind == "clustered" or "GEMM" in contender and kind == "clustered":
        pytest.skip("forced fastad paths on random data only")
    sgemm_rate("cpu")
    q, b = make_inputs(kind, m, n, d)
    fn = CONTENDERS[contender]
    if contender == PREPARED:
        prepared = fastad.ops.knn_prepare(b)

        def fn(q, b, k):
            return fastad.ops.knn(q, b, k, prepared=prepared)
    elif contender.startswith("faiss"):
        search = faiss_flat_l2(b)

        def fn(q, b, k):
            return search(q, k)

    benchmark.group = f"knn cpu {kind} M={m} N={n} D={d} k={k}"
    benchmark.pedantic(fn, args=(q, b, k), rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark, benchmark.group, contender, 2.0 * m * n * d)


# (M, N, D, k): one Lite0 PatchCore image against its bank (batch-1 latency), the acceptance shape,
# and a large search (100k queries against a 1M bank, 1.5 GB)
CUDA_SHAPES = [(784, 7840, 152, 9), (6272, 65536, 384, 9), (100_000, 1_000_000, 384, 9)]


def cuda_group(m: int, n: int, d: int, k: int) -> str:
    """The summary group of a CUDA shape (benchmarks/gpu_summary.py reads it)."""
    return f"knn cuda random M={m} N={n} D={d} k={k}"


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and fastad's CUDA kernels")
@pytest.mark.parametrize("m,n,d,k", CUDA_SHAPES, ids=[f"M{m}-N{n}-D{d}-k{k}" for m, n, d, k in CUDA_SHAPES])
@pytest.mark.parametrize("precision", ["highest", "high"], ids=["fp32-matmul", "tf32-matmul"])
@pytest.mark.parametrize("contender", ["fastad.ops.knn", "chunked matmul + topk"])
def test_knn_cuda(benchmark, record, contender, m, n, d, k, precision):
    """With precision "high" torch's float32 matmuls may use TF32: fastad's screen then widens its
    error bound and stays exact, while the chunked baseline's distances lose precision."""
    from .conftest import sgemm_rate

    sgemm_rate("cuda")
    benchmark.extra_info["gemm_gflops_at_this_precision"] = sgemm_rate("cuda", precision) / 1e9
    q, b = make_inputs("random", m, n, d, "cuda")
    fn = cuda_synced(
        CONTENDERS[contender]
        if contender.startswith("fastad")
        else lambda q, b, k: chunked_matmul_topk(q, b, k, chunk=2048)
    )
    benchmark.group = cuda_group(m, n, d, k)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        benchmark.pedantic(fn, args=(q, b, k), rounds=3, iterations=1, warmup_rounds=1)
    finally:
        torch.set_float32_matmul_precision(before)
    label = contender if precision == "highest" else f"{contender} (TF32 matmul)"
    record(benchmark, benchmark.group, label, 2.0 * m * n * d)

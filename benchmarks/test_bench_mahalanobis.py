"""Squared Mahalanobis distances: fastad.ops.mahalanobis against anomalib's batched matmul and the
float64 reference.

The acceptance shape is PaDiM's scoring step: B = 32 images of P = 3136 patches (56 x 56) with
D = 100 features, one Gaussian per patch (Q = P); the paper's Wide-ResNet-50 PaDiM (D = 550), one
shared Gaussian (Q = 1, as in Gaussian AD or one covariance per layer) and a single image (inline
inspection) are timed too. Each contender gets its matrices in the layout its own fitting code
produces: fastad the lower Cholesky factors of the precisions as torch.linalg.cholesky returns
them (column-major; "L row-major" times the .contiguous() copy), anomalib the inverse covariances
as torch.linalg.inv returns them, built from the same factors (L L^T) outside the timed region.
The floating-point count is the triangle's, B P D (D + 1) multiply-adds, for every contender: what
is needed, not what each one does.

Where the features sit in memory decides much of anomalib's time, so each case is timed on
  channels-last   x (B, P, D) contiguous: a CNN run in channels_last memory (fastad's
                  FeatureModel default) gives its features this way;
  channels-first  the same values in (B, D, P) memory seen as (B, P, D): a CNN's default NCHW
                  output, the layout anomalib's PaDiM works on;
and every contender gets the same tensor. With Q = P the op reads the P factors' lower triangles
(about 70 MB of cache lines at D = 100, 2 GB at D = 550) and the features (40 MB) once, so on a
small machine memory traffic sets as much of its time as arithmetic.
Run with `make bench` (or `pytest benchmarks -k mahalanobis --benchmark-only`).
"""

from __future__ import annotations

import functools

import pytest
import torch

import fastad
from fastad import reference

from .baselines import anomalib_mahalanobis
from .conftest import cuda_synced

CUDA_OK = fastad.build_info()["cuda"] and torch.cuda.is_available()
# (name, B, P, Q, D)
CASES = [
    ("per-patch Gaussians", 32, 3136, 3136, 100),
    ("one shared Gaussian", 32, 3136, 1, 100),
    ("one image, per-patch Gaussians", 1, 3136, 3136, 100),
    ("per-patch Gaussians, WRN-50 PaDiM", 32, 3136, 3136, 550),
]
LAYOUTS = ["channels-last", "channels-first"]
_CHUNK = 256  # positions at a time while building the matrices, to bound the set-up's memory


@functools.lru_cache(maxsize=1)  # one case's tensors (7.6 GB at D = 550), reused across contenders
def _values(b: int, p: int, q: int, d: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, p, d, generator=gen)
    mean = 0.1 * torch.randn(p, d, generator=gen)
    L = torch.empty(q, d, d).mT  # column-major storage, as torch.linalg.cholesky returns factors
    inv_cov = torch.empty(q, d, d).mT  # and as torch.linalg.inv returns inverses
    for start in range(0, q, _CHUNK):
        part = torch.randn(min(_CHUNK, q - start), d, d, generator=gen).tril_() / d**0.5
        part.diagonal(dim1=1, dim2=2).abs_().add_(0.5)
        L[start : start + _CHUNK] = part
        inv_cov[start : start + _CHUNK] = part @ part.mT
    return x, mean, L, inv_cov


def make_inputs(b: int, p: int, q: int, d: int, layout: str, device: str = "cpu"):
    """(x (b, p, d) in `layout`, mean (p, d), L (q, d, d) lower with a positive diagonal,
    column-major, inv_cov = L L^T column-major), float32 on `device`; the values do not depend
    on the layout."""
    x, mean, L, inv_cov = _values(b, p, q, d)
    if device != "cpu":
        x, mean, L, inv_cov = (t.to(device) for t in (x, mean, L, inv_cov))
    if layout == "channels-first":
        x = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    return x, mean, L, inv_cov


CONTENDERS = {
    "fastad.ops.mahalanobis": (lambda x, mean, L, inv_cov: fastad.ops.mahalanobis(x, mean, L), 10),
    "fastad.ops.mahalanobis, L row-major": (lambda x, mean, L, inv_cov: fastad.ops.mahalanobis(x, mean, L), 10),
    "anomalib batched matmul": (lambda x, mean, L, inv_cov: anomalib_mahalanobis(x, mean, inv_cov), 3),
    "fastad.reference.mahalanobis (float64)": (lambda x, mean, L, inv_cov: reference.mahalanobis(x, mean, L), 1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("case", CASES, ids=[c[0].replace(" ", "-").replace(",", "") for c in CASES])
def test_mahalanobis_cpu(benchmark, record, case, contender, layout):
    from .conftest import sgemm_rate

    name, b, p, q, d = case
    if contender.startswith("fastad.reference") and (b == 1 or d > 100 or layout != "channels-last"):
        pytest.skip("the reference is timed once, on the batched D = 100 cases")
    if contender.endswith("row-major") and (q == 1 or layout != "channels-last"):
        pytest.skip("the factor's layout is compared on the channels-last per-patch cases")
    sgemm_rate("cpu")
    x, mean, L, inv_cov = make_inputs(b, p, q, d, layout)
    if contender.endswith("row-major"):
        L = L.contiguous()
    fn, rounds = CONTENDERS[contender]
    benchmark.group = f"mahalanobis cpu {name} B={b} P={p} D={d} Q={q}, {layout} features"
    benchmark.pedantic(fn, args=(x, mean, L, inv_cov), rounds=rounds if d <= 100 else 3, iterations=1, warmup_rounds=1)
    record(benchmark, benchmark.group, contender, 2.0 * b * p * d * (d + 1) / 2)


def cuda_group(case: tuple[str, int, int, int, int]) -> str:
    """The summary group of a CUDA case (benchmarks/gpu_summary.py reads it)."""
    name, b, p, q, d = case
    return f"mahalanobis cuda {name} B={b} P={p} D={d} Q={q}"


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and fastad's CUDA kernels")
@pytest.mark.parametrize(
    "contender", ["fastad.ops.mahalanobis", "fastad.ops.mahalanobis, L row-major", "anomalib batched matmul"]
)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=["per-patch", "shared", "WRN-50"])
def test_mahalanobis_cuda(benchmark, record, case, contender):
    name, b, p, q, d = case
    x, mean, L, inv_cov = make_inputs(b, p, q, d, "channels-last", "cuda")
    if contender.endswith("row-major"):
        L = L.contiguous()
    args = (x, mean, L, inv_cov)
    fn, _ = CONTENDERS[contender]
    benchmark.group = cuda_group(case)
    benchmark.pedantic(cuda_synced(fn), args=args, rounds=10, iterations=1, warmup_rounds=1)
    record(benchmark, benchmark.group, contender, 2.0 * b * p * d * (d + 1) / 2)

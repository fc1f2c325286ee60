"""Squared Mahalanobis distances: fastad.ops.mahalanobis against anomalib's batched matmul and the
float64 reference.

The acceptance shape is PaDiM's scoring step: B = 32 images of P = 3136 patches (56 x 56) with
D = 100 features, one Gaussian per patch (Q = P); one shared Gaussian (Q = 1, as in Gaussian AD
or one covariance per layer) and a single image (inline inspection) are timed too. fastad gets the
lower Cholesky factors of the precisions; anomalib's way gets the full inverse covariances built
from them (L L^T), outside the timed region. The floating-point count is the triangle's,
B P D (D + 1) multiply-adds, for every contender: what is needed, not what each one does.

Where the features sit in memory decides much of anomalib's time, so each case is timed on
  channels-last   x (B, P, D) contiguous: a CNN run in channels_last memory (fastad's
                  FeatureModel default) gives its features this way;
  channels-first  the same values in (B, D, P) memory seen as (B, P, D): a CNN's default NCHW
                  output, the layout anomalib's PaDiM works on;
and every contender gets the same tensor. With Q = P the op reads the P factors' lower triangles
(about 83 MB at this shape) and the features (40 MB) once, so memory traffic, not arithmetic,
sets its time on a small machine.
Run with `make bench` (or `pytest benchmarks -k mahalanobis --benchmark-only`).
"""

from __future__ import annotations

import pytest
import torch

import fastad
from fastad import reference

from .baselines import anomalib_mahalanobis
from .conftest import cuda_synced

CUDA_OK = fastad.build_info()["cuda"] and torch.cuda.is_available()
D = 100
# (name, B, P, Q)
CASES = [
    ("per-patch Gaussians", 32, 3136, 3136),
    ("one shared Gaussian", 32, 3136, 1),
    ("one image, per-patch Gaussians", 1, 3136, 3136),
]
LAYOUTS = ["channels-last", "channels-first"]


def make_inputs(b: int, p: int, q: int, layout: str, device: str = "cpu"):
    """(x (b, p, D) in `layout`, mean (p, D), L (q, D, D) lower with a positive diagonal,
    inv_cov = L L^T), float32 on `device`; the values do not depend on the layout."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, p, D, generator=gen)
    mean = 0.1 * torch.randn(p, D, generator=gen)
    L = torch.randn(q, D, D, generator=gen).tril_() / D**0.5
    L.diagonal(dim1=1, dim2=2).abs_().add_(0.5)
    inv_cov = L @ L.mT
    x, mean, L, inv_cov = (t.to(device) for t in (x, mean, L, inv_cov))
    if layout == "channels-first":
        x = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    return x, mean, L, inv_cov


CONTENDERS = {
    "fastad.ops.mahalanobis": (lambda x, mean, L, inv_cov: fastad.ops.mahalanobis(x, mean, L), 10),
    "anomalib batched matmul": (lambda x, mean, L, inv_cov: anomalib_mahalanobis(x, mean, inv_cov), 3),
    "fastad.reference.mahalanobis (float64)": (lambda x, mean, L, inv_cov: reference.mahalanobis(x, mean, L), 1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=[c[0].replace(" ", "-") for c in CASES])
@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_mahalanobis_cpu(benchmark, record, contender, case, layout):
    from .conftest import sgemm_rate

    name, b, p, q = case
    if contender.startswith("fastad.reference") and (b == 1 or layout != "channels-last"):
        pytest.skip("the reference is timed once per batched case")
    sgemm_rate("cpu")
    args = make_inputs(b, p, q, layout)
    fn, rounds = CONTENDERS[contender]
    benchmark.group = f"mahalanobis cpu {name} B={b} P={p} D={D} Q={q}, {layout} features"
    benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=1)
    record(benchmark, benchmark.group, contender, 2.0 * b * p * D * (D + 1) / 2)


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and fastad's CUDA kernels")
@pytest.mark.parametrize("case", CASES[:2], ids=[c[0].replace(" ", "-") for c in CASES[:2]])
@pytest.mark.parametrize("contender", ["fastad.ops.mahalanobis", "anomalib batched matmul"])
def test_mahalanobis_cuda(benchmark, record, contender, case):
    name, b, p, q = case
    args = make_inputs(b, p, q, "channels-last", "cuda")
    fn, _ = CONTENDERS[contender]
    benchmark.group = f"mahalanobis cuda {name} B={b} P={p} D={D} Q={q}"
    benchmark.pedantic(cuda_synced(fn), args=args, rounds=10, iterations=1, warmup_rounds=1)
    record(benchmark, benchmark.group, contender, 2.0 * b * p * D * (D + 1) / 2)

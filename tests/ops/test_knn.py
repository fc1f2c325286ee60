"""fastad.ops.knn against the float64 definition in fastad.reference, on fresh random inputs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import fastad
from fastad import reference

from ..conftest import CUDA_SKIP

# (M, N, D, k). The CPU kernel has two paths: an int8-screened one (D >= 8, 32 k <= N, and
# without a prepared bank N >= 1024 and M >= 64; AMX, AVX-512 VNNI or AVX2 micro-kernel) and a
# float32 GEMM one (everything else); the shapes below exercise both, with sizes that are not
# multiples of any tile (4, 8 or 32 query rows, 16 or 32 bank columns, 64 padded dims, 64-row
# blocks, 512-column chunks, 1024 x 4096 GEMM tiles).
SHAPES = [
    (1, 1, 1, 1),
    (1, 7, 3, 7),  # k = N
    (5, 1, 4, 1),
    (33, 100, 1, 5),  # D = 1
    (50, 500, 64, 9),  # float32 path
    (10, 200, 50, 200),  # k = N, float32 path
    (1030, 4500, 20, 4),  # several GEMM tiles (when the path is forced; else screened)
    (70, 1030, 384, 9),  # screened path, ragged tails
    (3, 2000, 1536, 3),  # D = 1536, few rows: float32 path
    (64, 2000, 1536, 3),  # one block of query rows: the screen splits the bank across threads
    (130, 5000, 100, 64),  # screened, large k
    (100, 3000, 24, 1),  # screened at small D (SPADE's first Lite0 layer)
    (70, 1100, 8, 9),  # the screen's smallest D
    (70, 1100, 7, 9),  # one below: float32 path
]


def random_inputs(m, n, d, gen, device, dtype=torch.float32):
    q = torch.randn(m, d, generator=gen)
    b = torch.randn(n, d, generator=gen)
    return q.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def assert_knn_correct(query, bank, k, squared, dist, idx, seed=None):
    """Distances equal the float64 ones; indices equal the reference except among near-ties,
    where the chosen rows must be at the reported distance."""
    m = query.shape[0]
    assert dist.shape == (m, k) and idx.shape == (m, k)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    assert dist.device == query.device and idx.device == query.device
    dist, idx = dist.cpu(), idx.cpu()
    q, b = query.cpu().double(), bank.cpu().double()
    # One neighbour more than asked, where there is one: the k-th is a near-tie when the next row
    # lies at (nearly) the same distance, and only the (k+1)-th reference row can tell.
    k_ref = min(k + 1, bank.shape[0])
    ref_d, ref_i = reference.knn(q, b, k_ref, squared=squared)
    ref_d = ref_d.double()
    scale = float(b.square().sum(1).max().sqrt()) + float(q.square().sum(1).max().sqrt()) + 1e-6
    atol = 1e-4 * (scale**2 if squared else scale)
    msg = f"seed {seed}"
    assert torch.all(idx >= 0) and torch.all(idx < bank.shape[0]), msg
    assert all(len(set(row.tolist())) == k for row in idx), msg + ": repeated index in a row"
    torch.testing.assert_close(dist.double(), ref_d[:, :k], rtol=1e-4, atol=atol, msg=msg)
    assert torch.all(dist[:, 1:] >= dist[:, :-1]), msg + ": distances not ascending"
    # Each returned row really is at the returned distance.
    own = (q[:, None, :] - b[idx]).square().sum(-1)
    own = own if squared else own.sqrt()
    torch.testing.assert_close(dist.double(), own, rtol=1e-4, atol=atol, msg=msg)
    # Where the reference's neighbours are well separated, the indices are the same.
    full = torch.cat([ref_d, torch.full((m, 1), float("inf"), dtype=torch.float64)], 1)
    gaps = torch.minimum(
        torch.cat([torch.full((m, 1), float("inf"), dtype=torch.float64), full[:, 1:-1] - full[:, :-2]], 1),
        full[:, 1:] - full[:, :-1],
    )[:, :k]
    clear = gaps > 4 * atol
    assert torch.equal(idx[clear], ref_i[:, :k][clear]), msg


@pytest.fixture(params=["auto", "vnni", "avx2", "portable"])
def cpu_path(request, device, monkeypatch):
    """Runs a CPU case through the automatic path choice (the AMX screen where the CPU has it),
    the AVX-512 VNNI screen, the AVX2 screen and the float32 GEMM path (a kernel the CPU lacks
    falls back to the next lesser one)."""
    if request.param != "auto":
        if device != "cpu":
            pytest.skip("the CPU path switch is a CPU kernel knob")
        monkeypatch.setenv("FASTAD_KNN_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("squared", [False, True], ids=["plain", "squared"])
@pytest.mark.parametrize("m,n,d,k", SHAPES)
def test_matches_float64_reference(m, n, d, k, squared, device, cpu_path, rng):
    q, b = random_inputs(m, n, d, rng, device)
    dist, idx = fastad.ops.knn(q, b, k, squared=squared)
    assert_knn_correct(q, b, k, squared, dist, idx, rng.initial_seed())


@pytest.mark.parametrize("m,n,d,k", SHAPES)
def test_prepared_bank_gives_the_same_results(m, n, d, k, device, cpu_path, rng):
    q, b = random_inputs(m, n, d, rng, device)
    prepared = fastad.ops.knn_prepare(b)
    dist, idx = fastad.ops.knn(q, b, k, prepared=prepared)
    assert_knn_correct(q, b, k, False, dist, idx, rng.initial_seed())
    plain_d, plain_i = fastad.ops.knn(q, b, k)
    # Both paths re-rank with the same exact float32 sum, so they agree to the bit.
    assert torch.equal(dist, plain_d) and torch.equal(idx, plain_i)


@pytest.mark.parametrize("m", [1, 3, 31, 33, 65])
@pytest.mark.parametrize("k", [1, 9])
def test_prepared_bank_screens_small_queries(m, k, cpu_path, rng):
    # With the bank prepared, a few query rows take the screen too (partial row tiles, the bank
    # split across threads); clustered rows, like CNN patches, make it rule most rows out.
    centres = 3.0 * torch.randn(40, 152, generator=rng)
    b = centres[torch.randint(40, (6000,), generator=rng)] + 0.5 * torch.randn(6000, 152, generator=rng)
    q = centres[torch.randint(40, (m,), generator=rng)] + 0.5 * torch.randn(m, 152, generator=rng)
    prepared = fastad.ops.knn_prepare(b)
    assert prepared.dtype == torch.uint8 and prepared.numel() > 0
    dist, idx = fastad.ops.knn(q, b, k, prepared=prepared)
    assert_knn_correct(q, b, k, False, dist, idx, rng.initial_seed())
    dist, idx = fastad.ops.knn(b[:m], b, k, prepared=prepared)  # bank rows find themselves first
    assert torch.equal(idx[:, 0], torch.arange(m)) and torch.all(dist[:, 0] == 0)


def test_prepared_half_bank(rng):
    q, b = random_inputs(70, 3000, 64, rng, "cpu", torch.bfloat16)
    dist, idx = fastad.ops.knn(q, b, 3, prepared=fastad.ops.knn_prepare(b))
    assert_knn_correct(q.float(), b.float(), 3, False, dist, idx, rng.initial_seed())


@pytest.mark.parametrize("d,poison", [(7, None), (64, "nan"), (64, "inf")])
def test_prepare_is_empty_where_nothing_can_be_prepared(d, poison, rng):
    # D < 8 goes to the float32 path anyway; a non-finite bank cannot be bounded.
    q, b = random_inputs(70, 2000, d, rng, "cpu")
    if poison:
        b[5, 3] = float(poison)
    prepared = fastad.ops.knn_prepare(b)
    assert prepared.shape == (0,) and prepared.dtype == torch.uint8
    dist, idx = fastad.ops.knn(q, b, 2, prepared=prepared)
    plain_d, plain_i = fastad.ops.knn(q, b, 2)
    assert torch.equal(idx, plain_i) and torch.equal(dist.isnan(), plain_d.isnan())
    if poison is None:
        assert_knn_correct(q, b, 2, False, dist, idx, rng.initial_seed())
    # An empty preparation fits any bank.
    other = torch.randn(50, d, generator=rng)
    assert torch.equal(fastad.ops.knn(q[:4], other, 1, prepared=prepared)[1], fastad.ops.knn(q[:4], other, 1)[1])


def test_prepare_on_cuda_is_empty(rng):
    if CUDA_SKIP is not None:
        pytest.skip(CUDA_SKIP)
    q, b = random_inputs(70, 3000, 64, rng, "cuda")
    prepared = fastad.ops.knn_prepare(b)
    assert prepared.shape == (0,) and prepared.device == b.device
    dist, idx = fastad.ops.knn(q, b, 3, prepared=prepared)
    assert_knn_correct(q, b, 3, False, dist, idx, rng.initial_seed())


@pytest.mark.parametrize("n,d", [(600, 64), (1500, 64), (1200, 8)])
@pytest.mark.parametrize("k", [1, 3])
def test_exact_duplicates_lowest_index_first(n, d, k, device, cpu_path, rng):
    x = torch.randn(n // 3, d, generator=rng)
    bank = torch.cat([x, x, x]).to(device)
    query = x[::7].to(device)
    dist, idx = fastad.ops.knn(query, bank, k)
    rows = torch.arange(0, n // 3, 7, device=device)
    expected = torch.stack([rows + j * (n // 3) for j in range(3)], 1)[:, :k]
    assert torch.equal(idx, expected)
    assert torch.all(dist == 0)


def test_clustered_data_with_many_near_ties(device, cpu_path, rng):
    # Coarse values give many exactly equal distances: ties must follow index order.
    q = torch.randint(-2, 3, (200, 48), generator=rng).float().to(device)
    b = torch.randint(-2, 3, (3000, 48), generator=rng).float().to(device)
    dist, idx = fastad.ops.knn(q, b, 9, squared=True)
    ref_d, ref_i = reference.knn(q.cpu(), b.cpu(), 9, squared=True)
    assert torch.equal(dist.cpu(), ref_d)
    assert torch.equal(idx.cpu(), ref_i)


@pytest.mark.parametrize("offset", [0.0, 30.0, 1000.0])
def test_tight_cluster_far_from_origin(offset, device, cpu_path, rng):
    # Distances tiny next to the norms: the case where norm-expanded float32 distances cancel.
    centre = offset * torch.randn(96, generator=rng)
    q = (centre + 0.01 * torch.randn(40, 96, generator=rng)).to(device)
    b = (centre + 0.01 * torch.randn(2500, 96, generator=rng)).to(device)
    dist, idx = fastad.ops.knn(q, b, 7, squared=True)
    ref_d, ref_i = reference.knn(q.cpu(), b.cpu(), 7, squared=True)
    torch.testing.assert_close(dist.cpu(), ref_d, rtol=1e-4, atol=1e-7)
    assert (idx.cpu() == ref_i).float().mean() > 0.99  # the rest are float32 near-ties


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_exact_when_float32_matmuls_may_use_tf32_or_bf16(precision, rng):
    # The CUDA screen's GEMM follows the user's float32 matmul precision; its error bound must too.
    if CUDA_SKIP is not None:
        pytest.skip(CUDA_SKIP)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        q, b = random_inputs(300, 9000, 128, rng, "cuda")
        dist, idx = fastad.ops.knn(q, b, 9)
        assert_knn_correct(q, b, 9, False, dist, idx, rng.initial_seed())
        centre = 30.0 * torch.randn(96, generator=rng)
        qc = (centre + 0.01 * torch.randn(40, 96, generator=rng)).cuda()
        bc = (centre + 0.01 * torch.randn(2500, 96, generator=rng)).cuda()
        dist, idx = fastad.ops.knn(qc, bc, 7, squared=True)
    finally:
        torch.set_float32_matmul_precision(before)
    ref_d, _ = reference.knn(qc.cpu(), bc.cpu(), 7, squared=True)
    torch.testing.assert_close(dist.cpu(), ref_d, rtol=1e-4, atol=1e-7)


def test_non_contiguous_inputs(device, rng):
    qbig = torch.randn(80, 128, generator=rng).to(device)
    bt = torch.randn(64, 1500, generator=rng).to(device)
    q, b = qbig[::2, ::2], bt.t()  # strided rows and a transposed bank
    assert not q.is_contiguous() and not b.is_contiguous()
    dist, idx = fastad.ops.knn(q, b, 5)
    assert_knn_correct(q, b, 5, False, dist, idx, rng.initial_seed())


def test_empty_query(device):
    dist, idx = fastad.ops.knn(torch.empty(0, 8, device=device), torch.randn(10, 8, device=device), 3)
    assert dist.shape == (0, 3) and idx.shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype, device, rng):
    q, b = random_inputs(40, 2100, 64, rng, device, dtype)
    dist, idx = fastad.ops.knn(q, b, 4)
    assert dist.dtype == torch.float32
    assert_knn_correct(q.float(), b.float(), 4, False, dist, idx, rng.initial_seed())


@pytest.mark.parametrize("where", ["query", "bank"])
def test_non_finite_values_never_give_bad_indices(where, device, rng):
    q, b = random_inputs(20, 2000, 64, rng, device)
    t = q if where == "query" else b
    t[3, 5] = float("nan")
    t[7, 1] = float("inf")
    t[11] = float("nan")
    dist, idx = fastad.ops.knn(q, b, 5)
    assert torch.all(idx >= 0) and torch.all(idx < b.shape[0])


def test_opcheck(device, rng):
    q, b = random_inputs(12, 40, 8, rng, device)
    for squared in (False, True):
        torch.library.opcheck(torch.ops.fastad.knn.default, (q, b, 3, squared))
    q, b = random_inputs(12, 200, 40, rng, device)
    prepared = fastad.ops.knn_prepare(b)
    torch.library.opcheck(torch.ops.fastad.knn.default, (q, b, 3, False, prepared))
    torch.library.opcheck(torch.ops.fastad.knn_prepare.default, (b,))


def test_torch_compile_fullgraph(device, rng):
    @torch.compile(fullgraph=True)
    def nearest_distance_score(query, bank):
        dist, _ = fastad.ops.knn(query, bank, 3)
        return dist.mean(dim=1) * 2.0

    q, b = random_inputs(16, 64, 8, rng, device)
    expected = fastad.ops.knn(q, b, 3)[0].mean(dim=1) * 2.0
    torch.testing.assert_close(nearest_distance_score(q, b), expected)

    @torch.compile(fullgraph=True)
    def prepared_score(query, bank, prepared):
        dist, _ = fastad.ops.knn(query, bank, 1, prepared=prepared)
        return dist[:, 0] + 1.0

    q, b = random_inputs(16, 300, 40, rng, device)
    expected = fastad.ops.knn(q, b, 1)[0][:, 0] + 1.0
    torch.testing.assert_close(prepared_score(q, b, fastad.ops.knn_prepare(b)), expected)


_MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys, torch, fastad
    d = int(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(50_000, d, generator=g)
    b = torch.randn(50_000, d, generator=g)
    fastad.ops.knn(q[:10], b[:2000], 1)  # load everything lazily loaded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dist, idx = fastad.ops.knn(q, b, 1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert idx.shape == (50_000, 1)
    print((after - before) * 1024)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("d", [64, 16], ids=["screened-path", "float32-path"])
def test_memory_stays_one_tile_at_50k_by_50k(d):
    # A full 50,000 x 50,000 float32 distance matrix is 10 GB; the op must need a tile of it.
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(d)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown < 256 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MiB"

"""fastad.ops.kcenter_greedy against the float64 greedy in fastad.reference, on fresh random inputs.

Every selection is replayed in float64: each pick must be an unselected row at the largest
distance to the rows picked before it, except for explicit near-ties (float64 distances within
NEAR_TIE relative of the largest), where float32 rounding may order two rows either way; rows at
exactly equal distances must go lowest index first. Where no near-tie occurred the indices must
equal the reference's.
"""

from __future__ import annotations

import pytest
import torch

import fastad
from fastad import reference

NEAR_TIE = 1e-5  # relative float64 distance gap below which float32 may order two rows either way
INF = float("inf")

# (N, D, k, start). Inputs compared with the reference stay below 32768 elements, under ATen's
# grain size: its small per-step operations then run on one thread, which keeps the tests fast on
# a busy 2-core machine. Lengths that are not multiples of the CPU kernel's 16-float chunks, its
# groups of four rows and its 64-row chunks of chosen rows are included on purpose.
SHAPES = [
    (1, 1, 1, 0),
    (2, 1, 2, 1),  # k = N
    (7, 3, 7, 3),  # k = N, start != 0
    (100, 1, 40, 5),  # D = 1
    (300, 16, 300, 0),  # k = N
    (257, 33, 100, 256),  # start = N - 1
    (500, 64, 150, 234),
    (250, 128, 100, 7),
    (1500, 5, 400, 11),
]


def replay_in_float64(
    x: torch.Tensor, k: int, start: int, idx: torch.Tensor, radii: torch.Tensor, msg: str = ""
) -> int:
    """Checks a selection step by step in float64 and returns how many picks were near-ties."""
    n = x.shape[0]
    assert idx.shape == (k,) and radii.shape == (k,), msg
    assert idx.dtype == torch.int64 and radii.dtype == torch.float32, msg
    idx, radii = idx.cpu(), radii.cpu()
    assert int(idx[0]) == start, msg
    assert torch.all((idx >= 0) & (idx < n)), msg
    assert len(set(idx.tolist())) == k, msg + ": a row was selected twice"
    assert radii[0] == INF, msg
    assert torch.all(radii[1:] <= radii[:-1]), msg + ": radii increase"

    # Row i of `nearest` holds every row's float64 distance to the rows picked before step i.
    xd = x.cpu().double()
    dist = torch.cdist(xd[idx], xd, compute_mode="donot_use_mm_for_euclid_dist")  # (k, N), direct
    nearest = torch.cat([torch.full((1, n), INF, dtype=torch.float64), dist[:-1].cummin(0).values])
    order = torch.full((n,), k, dtype=torch.int64)
    order[idx] = torch.arange(k)  # the step at which each row was picked (k: never)
    steps = torch.arange(k)[:, None]
    candidates = nearest.masked_fill(order[None, :] < steps, -1.0)  # unselected rows only
    best = candidates.max(1).values
    got = nearest[steps[:, 0], idx]
    for i in range(1, k):
        pick, value, top = int(idx[i]), float(got[i]), float(best[i])
        step = f"{msg}, step {i}: picked row {pick} at {value!r}, the largest distance is {top!r}"
        assert value >= top * (1.0 - NEAR_TIE), step
        assert not torch.any(candidates[i, :pick] == value), step + "; a lower row ties exactly"
    torch.testing.assert_close(radii.double(), got, rtol=NEAR_TIE, atol=0.0, msg=msg)
    return int((got[1:] < best[1:]).sum())


def select(x: torch.Tensor, k: int, start: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the op on `device` and returns its outputs on the CPU, after checking where they were."""
    idx, radii = fastad.ops.kcenter_greedy(x.to(device), k, start=start)
    assert idx.device.type == radii.device.type == torch.device(device).type
    return idx.cpu(), radii.cpu()


def assert_matches_reference(x, k, start, idx, radii, msg=""):
    near_ties = replay_in_float64(x, k, start, idx, radii, msg)
    if near_ties == 0:
        ref_idx, _ = reference.kcenter_greedy(x.cpu().double(), k, start=start)
        assert torch.equal(idx.cpu(), ref_idx), msg


@pytest.fixture(params=["auto", "avx2", "portable", "cuda-pruned"])
def kernel_path(request, device, monkeypatch):
    """Runs a case with each kernel path of its device: on the CPU the best distance kernels for
    this CPU and the AVX2 and portable ones forced (FASTAD_KCENTER_CPU_ISA); on CUDA the default
    full path and the pruned one (FASTAD_KCENTER_CUDA_PATH=pruned)."""
    if request.param in ("avx2", "portable"):
        if device != "cpu":
            pytest.skip("the instruction-set switch is a CPU kernel knob")
        monkeypatch.setenv("FASTAD_KCENTER_CPU_ISA", request.param)
    elif request.param == "cuda-pruned":
        if device != "cuda":
            pytest.skip("the pruned / full switch is a CUDA kernel knob")
        monkeypatch.setenv("FASTAD_KCENTER_CUDA_PATH", "pruned")
    return request.param


@pytest.mark.parametrize("n,d,k,start", SHAPES)
def test_matches_float64_reference(n, d, k, start, device, kernel_path, rng):
    x = torch.randn(n, d, generator=rng)
    idx, radii = select(x, k, start, device)
    assert_matches_reference(x, k, start, idx, radii, f"seed {rng.initial_seed()}")


@pytest.mark.parametrize("kind", ["uniform-2d", "random-24d", "mixture-16d"])
def test_many_steps_on_larger_inputs(kind, device, kernel_path, rng):
    # Enough rows and steps for the CPU kernel's lazy heap to re-evaluate rows many times, stop
    # early and batch re-evaluations.
    if kind == "uniform-2d":
        x, k = torch.rand(6000, 2, generator=rng), 1200
    elif kind == "random-24d":
        x, k = torch.randn(12000, 24, generator=rng), 400
    else:
        centres = 4.0 * torch.randn(40, 16, generator=rng)
        x = centres[torch.randint(0, 40, (12000,), generator=rng)] + 0.3 * torch.randn(12000, 16, generator=rng)
        k = 400
    start = int(torch.randint(0, x.shape[0], (1,), generator=rng))
    idx, radii = select(x, k, start, device)
    replay_in_float64(x, k, start, idx, radii, f"seed {rng.initial_seed()}")


def test_tight_clusters_far_from_origin(device, kernel_path, rng):
    # Distances tiny next to the norms: where a norm-expanded float32 distance would cancel.
    centres = 1000.0 + 5.0 * torch.randn(12, 48, generator=rng)
    x = centres[torch.arange(600) % 12] + 0.01 * torch.randn(600, 48, generator=rng)
    idx, radii = select(x, 60, 17, device)
    assert_matches_reference(x, 60, 17, idx, radii, f"seed {rng.initial_seed()}")
    # The first 12 picks are one row of each cluster, after which radii are intra-cluster.
    assert radii[11] > 1.0 and radii[12] < 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype, device, kernel_path, rng):
    x = torch.randn(800, 40, generator=rng).to(dtype)
    idx, radii = select(x, 120, 3, device)
    assert radii.dtype == torch.float32
    assert_matches_reference(x.float(), 120, 3, idx, radii, f"seed {rng.initial_seed()}")


def test_non_contiguous_inputs(device, rng):
    big = torch.randn(1200, 90, generator=rng).to(device)
    for x in (big[::2, ::3], big[:200, :60].t()):
        assert not x.is_contiguous()
        idx, radii = fastad.ops.kcenter_greedy(x, 50, start=1)
        assert idx.device == radii.device == x.device
        assert_matches_reference(x, 50, 1, idx, radii, f"seed {rng.initial_seed()}")


def test_integer_coordinates_tie_exactly_like_the_reference(device, kernel_path, rng):
    # Small integer coordinates make every distance exact in float32 and float64, with many exact
    # ties (and duplicate rows): the tie rule alone decides, so the selections must be identical.
    x = torch.randint(-3, 4, (700, 5), generator=rng).float()
    idx, radii = select(x, 700, 9, device)
    ref_idx, ref_radii = reference.kcenter_greedy(x, 700, start=9)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(radii, ref_radii)


def test_duplicate_rows_come_last_lowest_index_first(device, kernel_path, rng):
    base = torch.randn(50, 8, generator=rng)
    x = torch.cat([base, base, base])  # rows r, r + 50 and r + 100 are equal
    idx, radii = select(x, 150, 60, device)
    replay_in_float64(x, 150, 60, idx, radii, f"seed {rng.initial_seed()}")
    # One copy of each distinct row first (all at positive distances)...
    assert torch.all(radii[1:50] > 0)
    assert sorted((idx[:50] % 50).tolist()) == list(range(50))
    # ...then every remaining copy at distance 0, in index order.
    assert torch.all(radii[50:] == 0)
    assert idx[50:].tolist() == sorted(set(range(150)) - set(idx[:50].tolist()))


def test_copies_scattered_through_the_rows_tie_exactly(device, kernel_path, rng):
    # Five copies of each row at random positions: whichever path evaluates a copy (a group of
    # four rows, a single row, the first pass), its distances must have the same bits as the other
    # copies', or a higher copy could be picked before a lower one.
    base = torch.randn(200, 40, generator=rng)
    x = base[torch.randperm(1000, generator=rng) % 200]
    idx, radii = select(x, 1000, 5, device)
    replay_in_float64(x, 1000, 5, idx, radii, f"seed {rng.initial_seed()}")
    first = {}
    for row in range(1000):
        first.setdefault(tuple(x[row].tolist()), row)
    first[tuple(x[5].tolist())] = 5  # the start row stands for its copies, whatever its index
    assert sorted(idx[:200].tolist()) == sorted(first.values())
    assert torch.all(radii[200:] == 0)


def test_identical_rows(device):
    x = torch.full((9, 4), 2.5, device=device)
    idx, radii = fastad.ops.kcenter_greedy(x, 9, start=4)
    assert idx.tolist() == [4, 0, 1, 2, 3, 5, 6, 7, 8]
    assert radii[0] == INF and torch.all(radii[1:] == 0)


def test_hand_computed_examples(device):
    # Points on a line at 0, 10, 4, 7: 10 is farthest from 0; then 4 (4 from 0, 6 from 10);
    # then 7 (3 from 4 and from 10).
    line = torch.tensor([[0.0], [10.0], [4.0], [7.0]], device=device)
    for fn in (fastad.ops.kcenter_greedy, reference.kcenter_greedy):
        idx, radii = fn(line, 4)
        assert idx.tolist() == [0, 1, 2, 3]
        assert radii.tolist() == [INF, 10.0, 4.0, 3.0]
    # Rows 1 and 2 tie at 3 from row 0: the lower index goes first; then row 2 is still 3 away
    # (6 from row 1), and row 3 is 1 from row 0.
    tie = torch.tensor([[0.0, 0.0], [3.0, 0.0], [-3.0, 0.0], [0.0, 1.0]], device=device)
    for fn in (fastad.ops.kcenter_greedy, reference.kcenter_greedy):
        idx, radii = fn(tie, 4)
        assert idx.tolist() == [0, 1, 2, 3]
        assert radii.tolist() == [INF, 3.0, 3.0, 1.0]


@pytest.mark.parametrize(
    "kind", ["random-128d", "clusters-32d", "line-64d", "duplicates-8d", "half-48d", "spread-2d", "subnormal-16d"]
)
def test_the_pruned_cuda_path_selects_what_the_full_one_does_bit_for_bit(kind, device, rng, monkeypatch):
    """The pruned path skips a row only when the triangle inequality (with its margin) shows the
    new centre cannot lower the row's distance, so its selection and radii must equal the full
    path's exactly, on inputs where pruning takes most rows (clusters, a line, a spread plane) and
    where it takes few (random in 128 dimensions), with duplicates, half rows and distances too
    small for a relative error bound."""
    if device != "cuda":
        pytest.skip("the pruned / full switch is a CUDA kernel knob")
    if kind == "random-128d":
        x, k = torch.randn(5000, 128, generator=rng), 600
    elif kind == "clusters-32d":
        centres = 6.0 * torch.randn(30, 32, generator=rng)
        x, k = centres[torch.randint(0, 30, (20000,), generator=rng)] + 0.2 * torch.randn(20000, 32, generator=rng), 900
    elif kind == "line-64d":
        direction = torch.randn(1, 64, generator=rng)
        x, k = torch.rand(9000, 1, generator=rng) * direction, 700
    elif kind == "duplicates-8d":
        base = torch.randn(300, 8, generator=rng)
        x, k = base[torch.randint(0, 300, (3000,), generator=rng)], 500  # k past the distinct rows
    elif kind == "half-48d":
        x, k = torch.randn(4000, 48, generator=rng).half(), 400
    elif kind == "spread-2d":
        x, k = torch.rand(30000, 2, generator=rng), 2500
    else:  # squared distances in float32's subnormal range, where relative error bounds fail
        x, k = 1e-20 * torch.randn(3000, 16, generator=rng), 300
    x = x.contiguous().to(device)
    start = int(torch.randint(0, x.shape[0], (1,), generator=rng))
    full = fastad.ops.kcenter_greedy(x, k, start=start)
    monkeypatch.setenv("FASTAD_KCENTER_CUDA_PATH", "pruned")
    pruned = fastad.ops.kcenter_greedy(x, k, start=start)
    assert torch.equal(pruned[0], full[0]), f"{kind}: the selections differ"
    assert torch.equal(pruned[1], full[1]), f"{kind}: the radii differ"


def test_an_unknown_cuda_path_is_refused(device, monkeypatch):
    if device != "cuda":
        pytest.skip("the pruned / full switch is a CUDA kernel knob")
    monkeypatch.setenv("FASTAD_KCENTER_CUDA_PATH", "fast")
    with pytest.raises(ValueError, match="FASTAD_KCENTER_CUDA_PATH must be full or pruned, got 'fast'"):
        fastad.ops.kcenter_greedy(torch.randn(10, 3, device=device), 3)


def test_non_finite_values_still_give_distinct_rows_on_cuda(device, kernel_path, rng):
    # CUDA does not check (it would cost a host synchronisation); the indices must stay valid.
    if device != "cuda":
        pytest.skip("the CPU rejects non-finite values (tested above)")
    x = torch.randn(500, 16, generator=rng)
    x[3, 2], x[40, 0], x[41] = float("nan"), float("inf"), float("nan")
    idx, _ = fastad.ops.kcenter_greedy(x.to(device), 500)
    assert sorted(idx.tolist()) == list(range(500))


def test_reference_rejects_bad_sizes():
    with pytest.raises(ValueError, match="k=6"):
        reference.kcenter_greedy(torch.randn(5, 3), 6)


def test_opcheck(device, rng):
    x = torch.randn(40, 6, generator=rng).to(device)
    for k, start in [(1, 0), (5, 3), (40, 39)]:
        torch.library.opcheck(torch.ops.fastad.kcenter_greedy.default, (x, k, start))


def test_torch_compile_fullgraph(device, rng):
    @torch.compile(fullgraph=True)
    def coreset(x):
        idx, radii = fastad.ops.kcenter_greedy(x, 8, start=2)
        return x[idx] * 2.0, radii[-1]

    x = torch.randn(64, 8, generator=rng).to(device)
    idx, radii = fastad.ops.kcenter_greedy(x, 8, start=2)
    rows, radius = coreset(x)
    torch.testing.assert_close(rows, x[idx] * 2.0)
    torch.testing.assert_close(radius, radii[-1])

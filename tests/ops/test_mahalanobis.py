"""fastad.ops.mahalanobis against the float64 definition in fastad.reference, on fresh random inputs.

The precisions are realistic: each factor is the Cholesky factor of the inverse of a sample
covariance of correlated features plus PaDiM's 0.01 I, and the samples are drawn from that
distribution (with one anomalous sample). Every factor carries garbage above its diagonal, which
the op must ignore. Results must match the float64 reference within RTOL, relative to each value.
"""

from __future__ import annotations

import pytest
import torch

import fastad
from fastad import reference

RTOL = 1e-4  # float32 sums of D products against float64; observed errors are about 2e-6
ISA_VARIABLE = "FASTAD_MAHALANOBIS_CPU_ISA"


def random_gaussians(q: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(factors (q, d, d) float32 lower Cholesky factors of the precisions, covariances (q, d, d)
    float64) of q sample covariances of d + 16 correlated feature vectors, regularised by 0.01 I."""
    n = d + 16
    mix = torch.randn(q, d, d, generator=gen, dtype=torch.float64)
    feats = torch.randn(q, n, d, generator=gen, dtype=torch.float64) @ mix
    feats = feats - feats.mean(1, keepdim=True)
    cov = feats.mT @ feats / (n - 1) + 0.01 * torch.eye(d, dtype=torch.float64)
    return torch.linalg.cholesky(torch.linalg.inv(cov)).float(), cov


def with_garbage_above_diagonal(
    factors: torch.Tensor, gen: torch.Generator, value: float | None = None
) -> torch.Tensor:
    """A copy with the strict upper triangle overwritten by large random numbers (or `value`)."""
    d = factors.shape[-1]
    upper = torch.ones(d, d, dtype=torch.bool).triu(1)
    junk = 1e3 * torch.randn(factors.shape, generator=gen) if value is None else torch.full(factors.shape, value)
    return torch.where(upper, junk, factors)


def make_inputs(b: int, p: int, d: int, q: int, mean_rows: int, gen: torch.Generator):
    """(x (b, p, d), mean (mean_rows, d), L (q, d, d) with garbage above the diagonal), float32:
    samples drawn from each position's Gaussian, the first one shifted far away."""
    return make_inputs_and_covariances(b, p, d, q, mean_rows, gen)[:3]


def make_inputs_and_covariances(b: int, p: int, d: int, q: int, mean_rows: int, gen: torch.Generator):
    """make_inputs' (x, mean, L) and the (q, d, d) float64 covariances whose precisions L factors."""
    factors, cov = random_gaussians(q, d, gen)
    mean = 2.0 * torch.randn(mean_rows, d, generator=gen)
    z = torch.randn(b, p, d, generator=gen, dtype=torch.float64)
    spread = torch.linalg.cholesky(cov).expand(p, d, d)
    x = (mean.double() + torch.einsum("pij,bpj->bpi", spread, z)).float()
    if b:
        x[0] += 3.0 * torch.randn(p, d, generator=gen)
    return x, mean, with_garbage_above_diagonal(factors, gen), cov


def assert_close_to_reference(out: torch.Tensor, x, mean, L, msg: str = "") -> None:
    expected = reference.mahalanobis(x.cpu(), mean.cpu(), L.cpu())
    assert out.dtype == torch.float32 and out.shape == expected.shape, msg
    torch.testing.assert_close(out.cpu(), expected, rtol=RTOL, atol=0.0, msg=msg)


@pytest.fixture(params=["avx512", "avx2", "portable"])
def cpu_isa(request, device, monkeypatch):
    """Runs a CPU case with each instruction set forced (the C++ reads the variable on every call;
    a set this CPU lacks falls back to the best one it has). CUDA cases run once."""
    if device != "cpu" and request.param != "avx512":
        pytest.skip("the instruction-set switch is a CPU kernel knob")
    monkeypatch.setenv(ISA_VARIABLE, request.param)
    return request.param


# (B, P, D, Q, mean rows). Sizes that are not multiples of the 16- and 8-wide panels, of the
# micro-kernels' 16 and 8 rows, or of the 64-sample chunks are included on purpose.
SHAPES = [
    (1, 1, 1, 1, 1),
    (1, 5, 17, 5, 5),  # B = 1
    (3, 1, 100, 1, 1),  # P = 1
    (4, 7, 1, 7, 1),  # D = 1, per-position factors, shared mean
    (20, 9, 100, 9, 9),  # B not a multiple of 16
    (7, 4, 130, 1, 4),  # shared factor, per-position means
    (33, 6, 16, 6, 1),
    (130, 3, 33, 3, 3),  # three chunks of samples
    (2, 3, 2, 1, 1),
]


@pytest.mark.parametrize("b,p,d,q,m", SHAPES, ids=[f"B{b}-P{p}-D{d}-Q{q}-M{m}" for b, p, d, q, m in SHAPES])
def test_matches_float64_reference(b, p, d, q, m, device, cpu_isa, rng):
    x, mean, L = make_inputs(b, p, d, q, m, rng)
    out = fastad.ops.mahalanobis(x.to(device), mean.to(device), L.to(device))
    assert out.device.type == torch.device(device).type
    assert_close_to_reference(out, x, mean, L, f"seed {rng.initial_seed()}")


@pytest.mark.parametrize("d,q", [(600, 2), (2048, 1)])
def test_wide_features(d, q, device, cpu_isa, rng):
    # Many panels and tiles of the factor, and D past the CPU kernel's prefetching bound. A plain
    # random triangular factor keeps the set-up cheap at these sizes.
    L = with_garbage_above_diagonal(torch.randn(q, d, d, generator=rng).tril() / d**0.5, rng)
    x, mean = torch.randn(3, 2, d, generator=rng), torch.randn(2, d, generator=rng)
    out = fastad.ops.mahalanobis(x.to(device), mean.to(device), L.to(device))
    assert_close_to_reference(out, x, mean, L, f"seed {rng.initial_seed()}")


def test_agrees_with_the_inverse_covariance(device, rng):
    # The meaning of L, independently of the reference: out = (x - mean)^T inverse(cov) (x - mean).
    x, mean, L, cov = make_inputs_and_covariances(6, 5, 40, 5, 5, rng)
    centred = x.double() - mean.double()
    expected = torch.einsum("bpi,pij,bpj->bp", centred, torch.linalg.inv(cov), centred)
    out = fastad.ops.mahalanobis(x.to(device), mean.to(device), L.to(device)).cpu()
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=0.0)


def test_hand_computed_example(device):
    # c = x - mean = (1, 1); L = [[2, .], [1, 3]]: L^T c = (2 + 1, 3) = (3, 3), squared norm 18.
    L = torch.tensor([[[2.0, 99.0], [1.0, 3.0]]], device=device)
    x = torch.tensor([[[1.5, 0.0], [0.5, 1.0]]], device=device)
    mean = torch.tensor([[0.5, -1.0], [0.5, 1.0]], device=device)  # position 1 sits on its mean
    for fn in (fastad.ops.mahalanobis, reference.mahalanobis):
        assert fn(x, mean, L).tolist() == [[18.0, 0.0]]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0])
def test_upper_triangle_is_ignored(value, device, cpu_isa, rng):
    # NaN or Inf above the diagonal would poison any sum that multiplied it, even by zero.
    x, mean, L = make_inputs(17, 5, 37, 5, 5, rng)
    clean = fastad.ops.mahalanobis(x.to(device), mean.to(device), L.tril().to(device))
    poisoned = fastad.ops.mahalanobis(
        x.to(device), mean.to(device), with_garbage_above_diagonal(L, rng, value).to(device)
    )
    assert torch.equal(clean, poisoned)


def test_shared_arguments_equal_their_expanded_copies(device, rng):
    # Q = 1 and one mean row must mean exactly "the same for every position".
    x, mean, L = (t.to(device) for t in make_inputs(9, 6, 24, 1, 1, rng))
    shared = fastad.ops.mahalanobis(x, mean, L)
    expanded = fastad.ops.mahalanobis(x, mean.expand(6, -1), L.expand(6, -1, -1))
    assert torch.equal(shared, expanded)


def test_non_contiguous_inputs(device, rng):
    b, p, d = 5, 12, 20
    x, mean, L = make_inputs(b, p, d, p, p, rng)
    # The way features arrive from a CNN: (B, D, P) channels-first, seen as (B, P, D).
    x_cf = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    views = [
        (x_cf, mean, L),
        (torch.stack([x, x], dim=1).reshape(2 * b, p, d)[::2], mean.t().contiguous().t(), L.mT.contiguous().mT),
        (x[:, ::3], mean[::3], L[::3]),
    ]
    for xv, mv, lv in views:
        xv, mv, lv = xv.to(device), mv.to(device), lv.to(device)
        assert not (xv.is_contiguous() and mv.is_contiguous() and lv.is_contiguous())
        assert_close_to_reference(fastad.ops.mahalanobis(xv, mv, lv), xv, mv, lv, f"seed {rng.initial_seed()}")


def factor_layouts(L: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same factors in the layouts users hold: row-major, column-major (what
    torch.linalg.cholesky returns) and neither (each row's entries two floats apart)."""
    wide = torch.zeros(*L.shape[:-1], 2 * L.shape[-1])
    wide[..., ::2] = L
    return {"row-major": L.contiguous(), "column-major": L.mT.contiguous().mT, "strided": wide[..., ::2]}


@pytest.mark.parametrize("b", [3, 5, 40])  # 3: the columns kernel; 5: samples in rows; 40: in lanes (32 + 8)
@pytest.mark.parametrize("d", [21, 64])  # 21: a partial block of factor columns
def test_every_factor_layout_gives_the_same_result(b, d, device, cpu_isa, rng):
    # Each layout is read where it lies (or, for odd strides, copied once per position) and summed
    # in the same order, so the results are equal bit for bit, and close to the float64 reference;
    # except that up to 4 samples on AVX-512 take a column-major factor as column dot products,
    # whose sums are ordered otherwise (close to the reference all the same).
    x, mean, L = make_inputs(b, 7, d, 7, 7, rng)
    outs = {}
    for name, lv in factor_layouts(L).items():
        outs[name] = fastad.ops.mahalanobis(x.to(device), mean.to(device), lv.to(device)).cpu()
        assert_close_to_reference(outs[name], x, mean, lv, f"{name}, seed {rng.initial_seed()}")
    assert torch.equal(outs["strided"], outs["row-major"])
    if b > 4 or device != "cpu" or cpu_isa != "avx512":
        assert torch.equal(outs["column-major"], outs["row-major"])


@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("d", [1, 15, 16, 17, 50])  # one column block, exactly one, one plus a bit, several
@pytest.mark.parametrize("junk", [None, float("nan")])
def test_few_samples_with_a_column_major_factor(b, d, junk, device, cpu_isa, rng):
    # A batch of 1 to 4 with torch.linalg.cholesky's layout: on AVX-512 each output column is a dot
    # product down the factor's column from its diagonal; nothing above the diagonal may count.
    x, mean, L = make_inputs(b, 6, d, 6, 6, rng)
    column_major = with_garbage_above_diagonal(L, rng, junk).mT.contiguous().mT
    assert column_major.stride(1) == 1
    out = fastad.ops.mahalanobis(x.to(device), mean.to(device), column_major.to(device))
    assert_close_to_reference(out, x, mean, L.tril(), f"seed {rng.initial_seed()}")


def test_factor_straight_from_cholesky(device, cpu_isa, rng):
    # The way PaDiM users hold it: torch.linalg.cholesky's column-major result, passed as returned.
    x, mean, _, cov = make_inputs_and_covariances(33, 6, 50, 6, 6, rng)
    L = torch.linalg.cholesky(torch.linalg.inv(cov).float())
    assert L.stride()[1:] == (1, 50), "torch.linalg.cholesky is expected to return column-major factors"
    out = fastad.ops.mahalanobis(x.to(device), mean.to(device), L.to(device))
    assert_close_to_reference(out, x, mean, L, f"seed {rng.initial_seed()}")


def test_factor_layout_helper(rng):
    L = make_inputs(2, 3, 9, 3, 3, rng)[2]
    column_major = fastad.ops.mahalanobis_factor_layout(L)
    assert torch.equal(column_major, L) and column_major.stride(1) == 1
    assert fastad.ops.mahalanobis_factor_layout(column_major) is column_major  # no copy when already so
    with pytest.raises(TypeError, match="L must be a"):
        fastad.ops.mahalanobis_factor_layout(L[0])


@pytest.mark.parametrize("q", [150, 1])
def test_channels_first_features(q, device, cpu_isa, rng):
    # A CNN's (B, D, H*W) memory seen as (B, P, D): features strided, positions contiguous. The CPU
    # kernel reads such x in blocks of 64 positions; P = 150 leaves a partial block and B = 70
    # two chunks of samples. Every other position of it is a view with neither stride 1.
    x, mean, L = make_inputs(70, 150, 24, q, 150, rng)
    x_cf = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    for xv, mv, lv in [(x_cf, mean, L), (x_cf[:, ::2], mean[::2], L[::2] if q > 1 else L)]:
        out = fastad.ops.mahalanobis(xv.to(device), mv.to(device), lv.to(device))
        assert_close_to_reference(out, xv, mv, lv, f"seed {rng.initial_seed()}")


@pytest.mark.parametrize("b,p,q,m", [(0, 4, 4, 4), (3, 0, 0, 0), (3, 0, 1, 1), (0, 0, 1, 0)])
def test_empty_batch_or_positions(b, p, q, m, device):
    x, mean, L = torch.ones(b, p, 5), torch.ones(m, 5), torch.eye(5).expand(q, 5, 5)
    out = fastad.ops.mahalanobis(x.to(device), mean.to(device), L.to(device))
    assert out.shape == (b, p) and out.dtype == torch.float32 and out.device.type == torch.device(device).type


def test_non_finite_values_stay_where_they_are(device, cpu_isa, rng):
    # Values are not checked: a bad value spoils the outputs that use it, and no other.
    x, mean, L = make_inputs(6, 8, 30, 8, 8, rng)
    x[1, 2, 5], mean[3, 0], L[4, 20, 3] = float("nan"), float("inf"), float("nan")
    out = fastad.ops.mahalanobis(x.to(device), mean.to(device), L.to(device)).cpu()
    bad = torch.zeros(6, 8, dtype=torch.bool)
    bad[1, 2] = bad[:, 3] = bad[:, 4] = True
    assert not out[bad].isfinite().any()
    expected = reference.mahalanobis(x, mean, L)
    torch.testing.assert_close(out[~bad], expected[~bad], rtol=RTOL, atol=0.0)


def test_reference_rejects_bad_dims():
    with pytest.raises(ValueError, match="need x \\(B, P, D\\)"):
        reference.mahalanobis(torch.ones(4, 3), torch.ones(4, 3), torch.ones(4, 3, 3))


def test_opcheck(device, rng):
    for b, p, d, q, m in [(3, 5, 7, 5, 5), (4, 3, 20, 1, 1), (0, 2, 3, 2, 1)]:
        x, mean, L = (t.to(device) for t in make_inputs(b, p, d, q, m, rng))
        torch.library.opcheck(torch.ops.fastad.mahalanobis.default, (x, mean, L))


def test_torch_compile_fullgraph(device, rng):
    @torch.compile(fullgraph=True)
    def anomaly_map(x, mean, L):
        return fastad.ops.mahalanobis(x, mean, L).clamp_min(0).sqrt().reshape(x.shape[0], 4, 4)

    x, mean, L = (t.to(device) for t in make_inputs(3, 16, 10, 16, 16, rng))
    expected = fastad.ops.mahalanobis(x, mean, L).sqrt().reshape(3, 4, 4)
    torch.testing.assert_close(anomaly_map(x, mean, L), expected)

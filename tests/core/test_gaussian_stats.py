"""Streaming Gaussian statistics (fastad.gaussian_stats) against float64 references.

References: numpy's mean / cov in float64 on the very values fed (after any float16/float32
rounding), scikit-learn's ledoit_wolf on each position's samples, torch.linalg.inv in float64.
Inputs are fresh random draws each run (seed printed by the ``rng`` fixture).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastad.gaussian_stats import GaussianAccumulator
from fastad.precision import precision_cholesky, precision_factors, regularized_covariance


def _feed(acc: GaussianAccumulator, x: torch.Tensor, batch: int) -> GaussianAccumulator:
    for start in range(0, x.shape[0], batch):
        acc.update(x[start : start + batch])
    return acc


def _samples(
    np_rng: np.random.Generator, n: int, p: int, d: int, offset: float = 0.0, isotropic: bool = False
) -> np.ndarray:
    """(n, p, d) samples with per-position means, plus ``offset``: correlated with uneven
    scales, or ``isotropic`` (identity covariance, the case Ledoit-Wolf shrinks most)."""
    if isotropic:
        return np_rng.normal(size=(n, p, d)) + np_rng.normal(size=(p, d)) * 3.0 + offset
    mixing = np_rng.normal(size=(p, d, d)) * np_rng.uniform(0.2, 2.0, size=(p, 1, d))
    z = np_rng.normal(size=(n, p, d))
    return np.einsum("npd,pde->npe", z, mixing) + np_rng.normal(size=(p, d)) * 3.0 + offset


def _np_cov(x: np.ndarray, ddof: int) -> np.ndarray:
    """Per-position numpy covariance of (n, p, d) -> (p, d, d)."""
    return np.stack([np.atleast_2d(np.cov(x[:, i].T, ddof=ddof)) for i in range(x.shape[1])])


def _assert_close(actual: torch.Tensor, expected: np.ndarray, rtol: float) -> None:
    """Elementwise, relative to the largest magnitude of the reference (covariance entries near
    zero carry the absolute error of their row, not a relative one)."""
    actual = actual.detach().cpu().numpy()
    assert actual.dtype == np.float64
    scale = max(np.abs(expected).max(), np.finfo(np.float64).tiny)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


# ----------------------------------------------------------------------------------------------
# Mean and covariance


@pytest.mark.parametrize(
    "p,d,n,batch,chunk",
    [
        (1, 1, 20, 1, 256),
        (1, 3, 40, 7, 256),
        (5, 3, 40, 13, 2),
        (17, 8, 33, 7, 4),
        (6, 5, 9, 9, 256),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_mean_and_covariance_match_numpy(np_rng, p, d, n, batch, chunk, dtype):
    x = torch.from_numpy(_samples(np_rng, n, p, d)).to(dtype)
    reference = x.double().numpy()  # the values actually fed, after rounding to dtype
    acc = _feed(GaussianAccumulator(p, d, position_chunk=chunk), x, batch)
    assert acc.count == n
    _assert_close(acc.mean(), reference.mean(0), 1e-12)
    for ddof in (0, 1):
        _assert_close(acc.covariance(ddof=ddof), _np_cov(reference, ddof), 1e-12)
    cov = acc.covariance()
    assert cov.shape == (p, d, d) and torch.equal(cov, cov.mT)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_offset_keeps_float64_accuracy(np_rng, dtype):
    # Spread 1e-2 around 1e4: raw moments (sum x x^T - n m m^T) would lose about 12 of the 16
    # digits here (relative error ~1e-4); the shifted sums must stay at float64 rounding.
    p, d, n = 3, 4, 57
    x = _samples(np_rng, n, p, d) * 1e-2 + 1e4
    x = torch.from_numpy(x).to(dtype)
    reference = x.double().numpy()
    acc = _feed(GaussianAccumulator(p, d), x, 5)
    _assert_close(acc.mean(), reference.mean(0), 1e-14)
    _assert_close(acc.covariance(), _np_cov(reference, 1), 1e-9)


def test_first_batch_of_one_and_non_contiguous_input(np_rng):
    # A first batch of one sample makes the shift that sample (not near the mean); an input
    # stored as (P, B, D) and transposed is not contiguous.
    p, d, n = 4, 3, 30
    x = torch.from_numpy(_samples(np_rng, n, p, d, offset=100.0)).transpose(0, 1).contiguous().transpose(0, 1)
    assert not x.is_contiguous()
    acc = GaussianAccumulator(p, d, position_chunk=3)
    acc.update(x[:1])
    acc.update(x[1:])
    _assert_close(acc.covariance(), _np_cov(x.numpy(), 1), 1e-10)


def test_accumulator_on_device(np_rng, device):
    p, d, n = 7, 5, 23
    x = torch.from_numpy(_samples(np_rng, n, p, d)).float()  # stays on the CPU: update moves it
    acc = _feed(GaussianAccumulator(p, d, device=device, fourth_moments=True, position_chunk=3), x, 6)
    assert acc.mean().device.type == device and acc.covariance().dtype == torch.float64
    _assert_close(acc.covariance(), _np_cov(x.double().numpy(), 1), 1e-12)
    shrunk, _ = acc.ledoit_wolf()
    cpu = _feed(GaussianAccumulator(p, d, fourth_moments=True), x, 6).ledoit_wolf()[0]
    _assert_close(shrunk, cpu.numpy(), 1e-10)


# ----------------------------------------------------------------------------------------------
# Ledoit-Wolf


@pytest.mark.parametrize(
    "p,d,n,batch,offset,isotropic",
    [
        (3, 6, 40, 7, 0.0, False),
        (2, 64, 8, 3, 0.0, True),  # n < D, identity covariance: strong shrinkage (~0.75)
        (2, 12, 5, 3, 0.0, False),
        (4, 5, 31, 13, 1e4, False),
        (2, 1, 15, 4, 0.0, False),  # D = 1: scikit-learn shrinks by 0
        (1, 30, 200, 64, 0.0, True),
    ],
)
def test_ledoit_wolf_matches_sklearn(np_rng, p, d, n, batch, offset, isotropic):
    covariance_module = pytest.importorskip("sklearn.covariance")
    x = _samples(np_rng, n, p, d, offset=offset, isotropic=isotropic)
    acc = _feed(GaussianAccumulator(p, d, fourth_moments=True, position_chunk=3), torch.from_numpy(x), batch)
    shrunk, shrinkage = acc.ledoit_wolf()
    assert shrunk.shape == (p, d, d) and shrinkage.shape == (p,) and shrinkage.dtype == torch.float64
    for i in range(p):
        ref_cov, ref_shrinkage = covariance_module.ledoit_wolf(x[:, i])
        _assert_close(shrunk[i], ref_cov, 1e-9)
        assert float(shrinkage[i]) == pytest.approx(float(ref_shrinkage), abs=1e-9)
    if n < d and isotropic:
        assert float(shrinkage.min()) > 0.5  # the regime the case is meant to cover


def test_ledoit_wolf_needs_fourth_moments(np_rng):
    acc = GaussianAccumulator(2, 3).update(torch.randn(4, 2, 3))
    with pytest.raises(ValueError, match="fourth_moments=True"):
        acc.ledoit_wolf()
    with pytest.raises(ValueError, match="fourth_moments=True"):
        regularized_covariance(acc, "ledoit_wolf")


# ----------------------------------------------------------------------------------------------
# Merge


def test_merge_of_halves_equals_one_pass(np_rng):
    sklearn_covariance = pytest.importorskip("sklearn.covariance")
    p, d = 5, 4
    x = _samples(np_rng, 50, p, d, offset=1e3)
    x[21:] += 40.0  # the halves have far-apart means and so different shifts
    whole = _feed(GaussianAccumulator(p, d, fourth_moments=True, position_chunk=2), torch.from_numpy(x), 9)
    first = _feed(GaussianAccumulator(p, d, fourth_moments=True, position_chunk=2), torch.from_numpy(x[:21]), 4)
    second = _feed(GaussianAccumulator(p, d, fourth_moments=True, position_chunk=3), torch.from_numpy(x[21:]), 6)
    second_before = second.state_dict()
    merged = first.merge(second)
    assert merged is first and merged.count == 50
    for key, value in second.state_dict().items():  # other is left alone
        assert torch.equal(value, second_before[key])
    _assert_close(merged.mean(), x.mean(0), 1e-14)
    _assert_close(merged.covariance(), _np_cov(x, 1), 1e-11)
    _assert_close(merged.covariance(), whole.covariance().numpy(), 1e-11)
    shrunk, shrinkage = merged.ledoit_wolf()
    for i in range(p):
        ref_cov, ref_shrinkage = sklearn_covariance.ledoit_wolf(x[:, i])
        _assert_close(shrunk[i], ref_cov, 1e-9)
        assert float(shrinkage[i]) == pytest.approx(float(ref_shrinkage), abs=1e-9)
    # Merging keeps the accumulator usable: more batches after a merge, far enough off that the
    # final centring moves the merged fourth-moment sums by a sizeable mean.
    extra = _samples(np_rng, 30, p, d, offset=1e3 + 60.0)
    merged.update(torch.from_numpy(extra))
    everything = np.concatenate([x, extra])
    _assert_close(merged.covariance(), _np_cov(everything, 1), 1e-11)
    shrinkage = merged.ledoit_wolf()[1]
    for i in range(p):
        ref_shrinkage = sklearn_covariance.ledoit_wolf(everything[:, i])[1]
        assert float(shrinkage[i]) == pytest.approx(float(ref_shrinkage), abs=1e-9)


def test_merge_with_empty_and_with_itself(np_rng):
    p, d = 3, 2
    x = _samples(np_rng, 12, p, d)
    acc = _feed(GaussianAccumulator(p, d, fourth_moments=True), torch.from_numpy(x), 5)
    empty = GaussianAccumulator(p, d, fourth_moments=True)
    before = acc.covariance()
    assert torch.equal(acc.merge(GaussianAccumulator(p, d, fourth_moments=True)).covariance(), before)
    _assert_close(empty.merge(acc).covariance(), _np_cov(x, 1), 1e-13)
    acc.merge(acc)
    doubled = np.concatenate([x, x])
    assert acc.count == 24
    _assert_close(acc.covariance(), _np_cov(doubled, 1), 1e-12)


def test_merge_rejects_incompatible():
    acc = GaussianAccumulator(3, 2, fourth_moments=True)
    with pytest.raises(ValueError, match=r"\(3, 2\) and \(3, 4\)"):
        acc.merge(GaussianAccumulator(3, 4, fourth_moments=True))
    with pytest.raises(ValueError, match="fourth moments"):
        acc.merge(GaussianAccumulator(3, 2))
    with pytest.raises(TypeError, match="GaussianAccumulator"):
        acc.merge(torch.zeros(3, 2))


def test_state_dict_round_trip(np_rng):
    p, d = 4, 3
    x = torch.from_numpy(_samples(np_rng, 20, p, d))
    acc = _feed(GaussianAccumulator(p, d, fourth_moments=True), x[:11], 4)
    restored = GaussianAccumulator(p, d, fourth_moments=True).load_state_dict(acc.state_dict())
    assert restored.count == 11
    restored.update(x[11:])
    _assert_close(restored.covariance(), _np_cov(x.numpy(), 1), 1e-12)
    with pytest.raises(ValueError, match=r"state\['shift'\] must be .* shape \(4, 4\)"):
        GaussianAccumulator(p, d + 1, fourth_moments=True).load_state_dict(acc.state_dict())
    with pytest.raises(ValueError, match="keys"):
        GaussianAccumulator(p, d).load_state_dict(acc.state_dict())


# ----------------------------------------------------------------------------------------------
# Regularisation and the precision factor


def test_precision_cholesky_inverts(np_rng):
    p, d = 6, 7
    x = torch.from_numpy(_samples(np_rng, 40, p, d))
    cov = regularized_covariance(_feed(GaussianAccumulator(p, d), x, 8), "empirical", eps=0.01)
    _assert_close(cov, _np_cov(x.numpy(), 1) + 0.01 * np.eye(d), 1e-12)
    factor = precision_cholesky(cov)
    assert factor.shape == (p, d, d) and factor.dtype == torch.float64
    assert torch.equal(factor, factor.tril())
    identity = torch.eye(d, dtype=torch.float64).expand(p, d, d)
    assert torch.allclose(factor @ factor.mT @ cov, identity, atol=1e-9)
    _assert_close(factor @ factor.mT, torch.linalg.inv(cov).numpy(), 1e-9)
    # float32 covariances are factored in float64 too.
    assert precision_cholesky(cov.float()).dtype == torch.float64
    # D = 1: the factor is 1 / sqrt(variance).
    single = torch.tensor([[[4.0]], [[0.25]]], dtype=torch.float64)
    assert torch.allclose(precision_cholesky(single).flatten(), torch.tensor([0.5, 2.0], dtype=torch.float64))


def test_singular_covariance_names_the_position(np_rng):
    p, d, n = 4, 8, 30
    x = _samples(np_rng, n, p, d)
    x[:, 2] = np_rng.normal(size=(n, 3)) @ np_rng.normal(size=(3, d))  # position 2 has rank 3
    acc = _feed(GaussianAccumulator(p, d, fourth_moments=True), torch.from_numpy(x), 7)
    with pytest.raises(ValueError, match=r"position 2 .*eps > 0.*ledoit_wolf"):
        precision_cholesky(regularized_covariance(acc, "empirical", eps=0.0))
    for covariance, eps in (("empirical", 0.01), ("ledoit_wolf", 0.0), ("ledoit_wolf", 0.01)):
        cov = regularized_covariance(acc, covariance, eps=eps)
        factor = precision_cholesky(cov)
        assert torch.allclose(factor @ factor.mT @ cov, torch.eye(d, dtype=torch.float64).expand(p, d, d), atol=1e-7)
    lw = regularized_covariance(acc, "ledoit_wolf", eps=0.0)
    assert torch.allclose(
        regularized_covariance(acc, "ledoit_wolf", eps=0.5) - lw,
        0.5 * torch.eye(d, dtype=torch.float64).expand(p, d, d),
    )


@pytest.mark.parametrize("covariance", ["empirical", "ledoit_wolf"])
def test_position_slices_and_chunked_factors_equal_the_whole(np_rng, covariance):
    p, d, n = 11, 6, 40
    acc = _feed(
        GaussianAccumulator(p, d, fourth_moments=True, position_chunk=4), torch.from_numpy(_samples(np_rng, n, p, d)), 9
    )
    whole = regularized_covariance(acc, covariance, eps=0.01)
    for part in (slice(0, 4), slice(3, 11), slice(5, 6), slice(7, None)):
        torch.testing.assert_close(
            regularized_covariance(acc, covariance, eps=0.01, positions=part), whole[part], rtol=0, atol=0
        )
    factors = precision_factors(acc, covariance, eps=0.01)
    assert factors.shape == (p, d, d) and factors.dtype == torch.float32
    torch.testing.assert_close(factors, precision_cholesky(whole).float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="contiguous slice"):
        acc.covariance(positions=slice(0, 10, 2))


def test_chunked_factors_name_the_singular_position(np_rng):
    p, d, n = 9, 5, 30
    x = _samples(np_rng, n, p, d)
    x[:, 6] = np_rng.normal(size=(n, 2)) @ np_rng.normal(size=(2, d))  # rank 2, in the second chunk
    acc = _feed(GaussianAccumulator(p, d, position_chunk=4), torch.from_numpy(x), 10)
    with pytest.raises(ValueError, match=r"position 6 "):
        precision_factors(acc, "empirical", eps=0.0)


def test_numerically_singular_covariance_is_rejected():
    # Cholesky succeeds on diag(1, 1e-17, 1), but a pivot below float64 rounding of the largest
    # variance means the inverse is noise: refused like an exactly singular one.
    cov = torch.eye(3, dtype=torch.float64).repeat(3, 1, 1)
    cov[1, 1, 1] = 1e-17
    assert int(torch.linalg.cholesky_ex(cov).info.abs().sum()) == 0
    with pytest.raises(ValueError, match="position 1 is singular"):
        precision_cholesky(cov)
    cov[1, 1, 1] = 1e-9  # badly conditioned but well within float64: accepted
    factor = precision_cholesky(cov)
    assert torch.allclose(factor @ factor.mT @ cov, torch.eye(3, dtype=torch.float64).expand(3, 3, 3), atol=1e-12)


def test_precision_cholesky_rejects_bad_input():
    good = torch.eye(3, dtype=torch.float64).expand(2, 3, 3).clone()
    with pytest.raises(ValueError, match=r"\(Q, D, D\)"):
        precision_cholesky(good[0])
    with pytest.raises(ValueError, match=r"\(Q, D, D\)"):
        precision_cholesky(torch.zeros(2, 3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        precision_cholesky(good.long())
    bad = good.clone()
    bad[1, 0, 2] = 0.5
    with pytest.raises(ValueError, match="position 1 is not symmetric"):
        precision_cholesky(bad)
    bad = good.clone()
    bad[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="position 1 holds NaN"):
        precision_cholesky(bad)
    indefinite = good.clone()
    indefinite[0, 2, 2] = -1.0
    with pytest.raises(ValueError, match="position 0 is singular or not positive definite"):
        precision_cholesky(indefinite)


def test_unknown_covariance_name_lists_the_choices():
    acc = GaussianAccumulator(1, 2).update(torch.randn(3, 1, 2))
    with pytest.raises(ValueError, match="'empirical', 'ledoit_wolf'.*'oas'"):
        regularized_covariance(acc, "oas")
    with pytest.raises(ValueError, match="eps"):
        regularized_covariance(acc, eps=-0.1)


# ----------------------------------------------------------------------------------------------
# Bad input to the accumulator


def test_update_rejects_bad_batches_and_accumulates_nothing():
    acc = GaussianAccumulator(3, 4, fourth_moments=True).update(torch.randn(5, 3, 4))
    before = acc.state_dict()
    cases = [
        (torch.randn(3, 4), ValueError, "3-D"),
        (torch.randn(2, 5, 4), ValueError, r"P=3, D=4.*\(2, 5, 4\)"),
        (torch.randn(2, 3, 2), ValueError, r"P=3, D=4.*\(2, 3, 2\)"),
        (torch.zeros(0, 3, 4), ValueError, "at least one sample"),
        (torch.ones(2, 3, 4, dtype=torch.int64), TypeError, "floating-point.*int64"),
        ([[[0.0] * 4] * 3], TypeError, "torch.Tensor"),
    ]
    for value in (float("nan"), float("inf")):
        poisoned = torch.randn(2, 3, 4)
        poisoned[1, 2, 3] = value
        cases.append((poisoned, ValueError, "NaN or infinite"))
    for x, error, message in cases:
        with pytest.raises(error, match=message):
            acc.update(x)
    assert acc.count == 5
    for key, value in acc.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_results_need_enough_samples():
    acc = GaussianAccumulator(2, 3)
    with pytest.raises(ValueError, match="seen 0"):
        acc.mean()
    acc.update(torch.randn(1, 2, 3))
    assert torch.equal(acc.covariance(ddof=0), torch.zeros(2, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="ddof=1 needs more than 1"):
        acc.covariance()
    with pytest.raises(ValueError, match="ddof"):
        acc.covariance(ddof=-1)


@pytest.mark.parametrize(
    "kwargs,message,error",
    [
        (dict(positions=0, dim=3), "positions", ValueError),
        (dict(positions=2, dim=2.0), "dim", TypeError),
        (dict(positions=2, dim=3, position_chunk=0), "position_chunk", ValueError),
        (dict(positions=2, dim=3, device="gpu:x"), "device", ValueError),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message, error):
    with pytest.raises(error, match=message):
        GaussianAccumulator(**kwargs)


# ----------------------------------------------------------------------------------------------
# Memory


def _largest_allocation(fn) -> int:
    """Largest single CPU allocation (bytes) while ``fn`` runs, from the profiler's raw memory
    records (the per-op summaries net out temporaries freed inside an op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        pytest.skip("this torch's profiler exposes no raw memory records (kineto_results)")
    sizes = [event.nbytes() for event in results.events() if event.name() == "[memory]"]
    return max(sizes, default=0)


def test_update_allocates_no_full_outer_product_temporary():
    p, d, b, chunk = 64, 48, 6, 8
    full = p * d * d * 8  # one float64 (P, D, D) tensor
    x = torch.randn(b, p, d)
    acc = GaussianAccumulator(p, d, fourth_moments=True, position_chunk=chunk).update(x)

    def naive() -> None:  # the allocation the test must be able to see
        y = x.double().permute(1, 0, 2)
        acc._sum_outer.add_(torch.bmm(y.mT, y))

    assert _largest_allocation(naive) >= full, "the profiler did not record a known (P, D, D) allocation"
    largest = _largest_allocation(lambda: acc.update(x))
    assert largest <= full // 8, f"update allocated {largest} bytes at once; a (P, D, D) float64 is {full}"

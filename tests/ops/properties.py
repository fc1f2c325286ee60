"""Generated inputs for the four ops: every call matches fastad.reference (scikit-learn for OMP)
or raises a clear ValueError/TypeError, never crashes or returns out-of-range indices.

Shapes include 0 and 1 and sizes around the kernels' thresholds (the kNN screen's D >= 8), dtypes
valid and invalid, layouts users hold (transposed, strided, stride-0 expanded, column slices),
values with exact ties and duplicates, clusters far from the origin, NaN and +-Inf, and sizes
(k, start, n_nonzero) at and beyond their edges. Each ``check_*`` runs a Hypothesis search; the
tests call them in a worker process (tests/isolation.py), so a crash is a failed test with its
signal, not the end of the run. The tensors come from a drawn seed, so a failure's printed
example reproduces it.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastad
from fastad import reference

from .. import hypothesis_profiles  # noqa: F401  (profiles in the worker process too)
from .test_kcenter import replay_in_float64
from .test_knn import assert_knn_correct
from .test_mahalanobis import RTOL as MAHALANOBIS_RTOL
from .test_omp import canonical, is_near_tie, sklearn_omp

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = st.sampled_from([torch.float32] * 6 + [torch.float16, torch.bfloat16, torch.float64, torch.int32])
LAYOUTS = st.sampled_from(["contiguous", "transposed", "row-strided", "column-slice", "expanded"])
POISONS = st.sampled_from([None] * 4 + [float("nan"), float("inf"), -float("inf")])
ARGUMENT_NAMES = {"query", "bank", "k", "x", "start", "mean", "L", "dictionary", "n_nonzero", "prepared", "squared"}


def _values(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """float64 values of a kind: exact ties and duplicates come from small integers."""
    if kind == "normal":
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "integers":
        return torch.randint(-2, 3, shape, generator=gen).double()
    if kind == "duplicates":  # rows drawn from a pool of three
        if len(shape) < 2 or shape[0] == 0:
            return torch.zeros(shape, dtype=torch.float64)
        pool = torch.randint(-2, 3, (3,) + shape[1:], generator=gen).double()
        return pool[torch.randint(0, 3, (shape[0],), generator=gen)]
    if kind == "constant":
        return torch.full(shape, 1.5, dtype=torch.float64)
    if kind == "far":  # a tight cluster far from the origin: cancellation in ||a||^2 + ||b||^2 - 2ab
        return 1e3 + 1e-1 * torch.randn(shape, generator=gen, dtype=torch.float64)
    raise ValueError(kind)


def _layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values held in a layout users meet, as a view where the layout is one."""
    if values.dim() < 2 or values.numel() == 0 or layout == "contiguous":
        return values.contiguous()
    if layout == "transposed":  # column-major, as a transposed tensor or torch.linalg.cholesky gives
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "row-strided":
        big = values.new_zeros((values.shape[0] * 2,) + values.shape[1:])
        big[::2] = values
        return big[::2]
    if layout == "column-slice":
        big = values.new_zeros(values.shape[:-1] + (values.shape[-1] + 3,))
        big[..., 1:-2] = values
        return big[..., 1:-2]
    if layout == "expanded":  # stride 0 along the first dimension: every row the same
        return values[:1].expand(values.shape)
    raise ValueError(layout)


def _poison(t: torch.Tensor, value: float | None, gen: torch.Generator) -> bool:
    if value is None or t.numel() == 0 or not t.is_floating_point():
        return False
    flat = t.view(-1) if t.is_contiguous() else None
    position = int(torch.randint(0, t.numel(), (1,), generator=gen))
    if flat is not None:
        flat[position] = value
    else:
        t[np.unravel_index(position, tuple(t.shape))] = value
    return True


def _materialise(values: torch.Tensor, dtype: torch.dtype, layout: str, device: str) -> torch.Tensor:
    # The layout last: .to() would make a strided view contiguous again.
    return _layout(values.to(device=device, dtype=dtype), layout)


# What each search did, returned to the test for the reliability table in benchmarks/RESULTS.md.
TALLY: dict[str, int] = {}


def _count(outcome: str) -> None:
    TALLY[outcome] = TALLY.get(outcome, 0) + 1


def _search(strategy, run, device: str) -> dict[str, int]:
    """Runs the search; returns how many generated cases raised as they should and how many
    were computed and checked against the reference (shrinking's replays included)."""
    TALLY.clear()

    def one(case):
        before = sum(TALLY.values())
        run(case, device)
        if sum(TALLY.values()) == before:
            _count("checked")

    # Each example costs milliseconds: eight times the profile's count (200 fast, 8000 long).
    given(strategy)(settings(max_examples=settings.default.max_examples * 8)(one))()
    return dict(TALLY)


def _expect_error(call, allowed: set[type], context: str) -> None:
    """``call`` must raise one of ``allowed``, with a one-line message that starts by naming an
    argument (or the environment switch) it is about."""
    try:
        call()
    except (ValueError, TypeError) as exc:
        assert type(exc) in allowed, f"{context}: raised {type(exc).__name__}: {exc}, expected one of {allowed}"
        message = str(exc)
        assert message and "\n" not in message, f"{context}: message {message!r}"
        assert message.split()[0] in ARGUMENT_NAMES, f"{context}: message does not name the argument: {message!r}"
    else:
        raise AssertionError(f"{context}: no error, expected one of {allowed}")
    _count("raised")


# ---- knn ----------------------------------------------------------------------------------------


def _pick(draw, flaw: str, table: dict, otherwise):
    """``table[flaw]`` when the flaw sets this value (0 included), else a draw from ``otherwise``."""
    return table[flaw] if flaw in table else draw(otherwise)


def _flaw(draw, flaws: list[str]) -> str:
    """Most cases are valid; the others carry one flaw, so the exception they must raise is known."""
    return draw(st.sampled_from(["none"] * len(flaws) * 2 + flaws))


VALID_FLOATS = st.sampled_from([torch.float32] * 6 + [torch.float16, torch.bfloat16])


@st.composite
def knn_cases(draw):
    flaw = _flaw(
        draw, ["k-0", "k-negative", "k-above-n", "k-huge", "empty-bank", "query-double", "bank-int", "mixed-dtype"]
    )
    # One case in four is large enough for the CPU's int8 screen (N >= 1024, M >= 64, D >= 8).
    big = draw(st.sampled_from([False, False, False, True]))
    n = 0 if flaw == "empty-bank" else draw(st.integers(1000, 3000) if big else st.integers(1, 70))
    k = _pick(
        draw,
        flaw,
        {"k-0": 0, "k-negative": -3, "k-above-n": n + 1, "k-huge": 2**40},
        st.integers(1, max(1, min(n, 40))),
    )
    q_dtype = _pick(draw, flaw, {"query-double": torch.float64, "bank-int": torch.float32}, VALID_FLOATS)
    b_dtype = {
        "bank-int": torch.int32,
        "query-double": torch.float64,
        "mixed-dtype": torch.float16 if q_dtype != torch.float16 else torch.float32,
    }.get(flaw, q_dtype)
    return dict(
        flaw=flaw,
        m=draw(st.integers(60, 130) if big else st.integers(0, 40)),
        n=n,
        k=k,
        d=draw(st.sampled_from([8, 13, 24, 32, 33, 64, 100, 200] if big else [1, 2, 3, 7, 8, 24, 31, 32, 33, 64, 100])),
        q_dtype=q_dtype,
        b_dtype=b_dtype,
        q_layout=draw(LAYOUTS),
        b_layout=draw(LAYOUTS),
        kind=draw(st.sampled_from(["normal", "integers", "duplicates", "constant", "far"])),
        squared=draw(st.booleans()),
        prepared=draw(st.booleans()),
        q_poison=draw(POISONS),
        b_poison=draw(POISONS),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def run_knn_case(case: dict, device: str) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    m, n, d, k = case["m"], case["n"], case["d"], case["k"]
    query = _materialise(_values(case["kind"], (m, d), gen), case["q_dtype"], case["q_layout"], device)
    bank = _materialise(_values(case["kind"], (n, d), gen), case["b_dtype"], case["b_layout"], device)
    poisoned = False
    if case["q_poison"] is not None and case["q_layout"] != "expanded":
        poisoned |= _poison(query, case["q_poison"], gen)
    if case["b_poison"] is not None and case["b_layout"] != "expanded":
        poisoned |= _poison(bank, case["b_poison"], gen)
    context = f"knn case {case} on {device}"

    bank_ok = bank.dtype in FLOATS and n >= 1
    prepared = None
    if case["prepared"]:
        if bank_ok:
            prepared = fastad.ops.knn_prepare(bank)
            assert prepared.dtype == torch.uint8 and prepared.dim() == 1, context
        else:
            _expect_error(lambda: fastad.ops.knn_prepare(bank), {TypeError, ValueError}, context + " (prepare)")

    problems = set()
    if bank.dtype not in FLOATS or query.dtype not in FLOATS or bank.dtype != query.dtype:
        problems.add(TypeError)
    if n == 0 or not 1 <= k <= n:
        problems.add(ValueError)
    call = lambda: fastad.ops.knn(query, bank, k, squared=case["squared"], prepared=prepared)  # noqa: E731
    if problems:
        _expect_error(call, problems, context)
        return
    dist, idx = call()
    assert dist.shape == (m, k) and idx.shape == (m, k), context
    if m == 0:
        return
    if poisoned:  # distances unspecified; indices must stay valid
        assert bool(((idx >= 0) & (idx < n)).all()), context
        return
    assert_knn_correct(query, bank, k, case["squared"], dist, idx, context)
    if case["kind"] in ("integers", "duplicates", "constant") and query.dtype != torch.bfloat16:
        # Every distance is exact in float32: the order, ties to the lower index, must be exact.
        _, ref_idx = reference.knn(query.cpu().double(), bank.cpu().double(), k, squared=case["squared"])
        assert torch.equal(idx.cpu(), ref_idx), context + ": exact ties not broken by the lowest index"


def check_knn(device: str) -> dict[str, int]:
    return _search(knn_cases(), run_knn_case, device)


# ---- kcenter_greedy -----------------------------------------------------------------------------


@st.composite
def kcenter_cases(draw):
    flaw = _flaw(draw, ["k-0", "k-above-n", "start-negative", "start-n", "no-rows", "no-columns", "double", "int"])
    big = draw(st.sampled_from([False, False, False, True]))  # enough rows for the lazy bounds to matter
    n = 0 if flaw == "no-rows" else draw(st.integers(500, 3000) if big else st.integers(1, 60))
    return dict(
        flaw=flaw,
        n=n,
        d=0 if flaw == "no-columns" else draw(st.sampled_from([1, 2, 3, 5, 16, 33])),
        k=_pick(draw, flaw, {"k-0": 0, "k-above-n": n + 1}, st.integers(1, max(1, min(n, 150)))),
        start=_pick(draw, flaw, {"start-negative": -1, "start-n": n}, st.integers(0, max(0, n - 1))),
        dtype=_pick(draw, flaw, {"double": torch.float64, "int": torch.int32}, VALID_FLOATS),
        layout=draw(LAYOUTS),
        kind=draw(st.sampled_from(["normal", "integers", "duplicates", "constant", "far", "huge"])),
        poison=draw(POISONS),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def run_kcenter_case(case: dict, device: str) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    n, d, k, start = case["n"], case["d"], case["k"], case["start"]
    kind = case["kind"]
    values = _values("normal", (n, d), gen) * 1e20 if kind == "huge" else _values(kind, (n, d), gen)
    x = _materialise(values, case["dtype"], case["layout"], device)
    poisoned = case["layout"] != "expanded" and _poison(x, case["poison"], gen)
    context = f"kcenter case {case} on {device}"
    call = lambda: fastad.ops.kcenter_greedy(x, k, start=start)  # noqa: E731
    problems = set()
    if x.dtype not in FLOATS:
        problems.add(TypeError)
    if n == 0 or d == 0 or not 1 <= k <= n or not 0 <= start < n:
        problems.add(ValueError)
    if problems:
        _expect_error(call, problems, context)
        return
    if device == "cpu" and poisoned:
        _expect_error(call, {ValueError}, context)  # the CPU refuses non-finite values
        return
    if device == "cpu" and kind == "huge":
        try:  # values near 1e20 may overflow float32's squared distances (or be inf in float16)
            idx, radii = call()
        except ValueError as exc:
            assert "overflow float32" in str(exc) or "finite values" in str(exc), context
            return
        replay_in_float64(x, k, start, idx, radii, context)
        return
    idx, radii = call()
    if poisoned or kind == "huge":  # CUDA: unspecified, but distinct valid rows
        assert len(set(idx.tolist())) == k and all(0 <= i < n for i in idx.tolist()), context
        return
    near_ties = replay_in_float64(x, k, start, idx, radii, context)
    if near_ties == 0:
        ref_idx, _ = reference.kcenter_greedy(x.cpu().double(), k, start=start)
        assert torch.equal(idx.cpu(), ref_idx), context


def check_kcenter(device: str) -> dict[str, int]:
    return _search(kcenter_cases(), run_kcenter_case, device)


# ---- mahalanobis --------------------------------------------------------------------------------


@st.composite
def mahalanobis_cases(draw):
    flaw = _flaw(draw, ["x-double", "x-int", "mean-double", "L-half", "no-features"])
    return dict(
        flaw=flaw,
        b=draw(st.integers(0, 4)),
        p=draw(st.integers(0, 6)),
        d=0 if flaw == "no-features" else draw(st.sampled_from([1, 2, 3, 5, 8, 17, 33])),
        shared_mean=draw(st.booleans()),
        shared_l=draw(st.booleans()),
        x_dtype={"x-double": torch.float64, "x-int": torch.int32}.get(flaw, torch.float32),
        mean_dtype=torch.float64 if flaw == "mean-double" else torch.float32,
        l_dtype=torch.float16 if flaw == "L-half" else torch.float32,
        x_layout=draw(
            st.sampled_from(["contiguous", "transposed", "row-strided", "column-slice", "expanded", "channels-first"])
        ),
        mean_layout=draw(LAYOUTS),
        l_layout=draw(st.sampled_from(["contiguous", "transposed", "row-strided"])),
        garbage=draw(st.sampled_from([None, 1e30, float("nan")])),
        poison=draw(POISONS),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def run_mahalanobis_case(case: dict, device: str) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    b, p, d = case["b"], case["p"], case["d"]
    q = 1 if case["shared_l"] else p
    rows = 1 if case["shared_mean"] else p
    x_values = torch.randn(b, p, d, generator=gen, dtype=torch.float64)
    if case["x_layout"] == "channels-first":  # features (B, D, P) read as (B, P, D), as PaDiM holds them
        x = x_values.to(device=device, dtype=case["x_dtype"]).transpose(1, 2).contiguous().transpose(1, 2)
    else:
        x = _materialise(x_values, case["x_dtype"], case["x_layout"], device)
    mean = _materialise(
        torch.randn(rows, d, generator=gen, dtype=torch.float64), case["mean_dtype"], case["mean_layout"], device
    )
    # Lower factors with a dominant positive diagonal; the strict upper triangle holds garbage.
    lower = (
        torch.randn(q, d, d, generator=gen, dtype=torch.float64).tril(-1) * 0.3
        + torch.eye(d, dtype=torch.float64) * 1.5
    )
    if case["garbage"] is not None:
        lower = lower + torch.full((d, d), case["garbage"], dtype=torch.float64).triu(1)
    L = _materialise(lower, case["l_dtype"], case["l_layout"], device)
    context = f"mahalanobis case {case} on {device}"
    poisoned = False
    if case["x_layout"] != "expanded" and x.dtype == torch.float32:
        poisoned = _poison(x, case["poison"], gen)
    call = lambda: fastad.ops.mahalanobis(x, mean, L)  # noqa: E731
    problems = set()
    if torch.float32 != x.dtype or torch.float32 != mean.dtype or torch.float32 != L.dtype:
        problems.add(TypeError)
    if d == 0:
        problems.add(ValueError)
    if problems:
        _expect_error(call, problems, context)
        return
    out = call()
    assert out.shape == (b, p) and out.dtype == torch.float32, context
    expected = reference.mahalanobis(x.cpu(), mean.cpu(), L.cpu().tril())
    good = torch.isfinite(x.cpu()).all(-1)
    if poisoned:
        assert not bool(torch.isfinite(out.cpu()[~good]).any()), (
            context + ": a non-finite sample gave a finite distance"
        )
    torch.testing.assert_close(out.cpu()[good], expected[good], rtol=MAHALANOBIS_RTOL, atol=0.0, msg=context)


def check_mahalanobis(device: str) -> dict[str, int]:
    return _search(mahalanobis_cases(), run_mahalanobis_case, device)


# ---- omp ----------------------------------------------------------------------------------------


@st.composite
def omp_cases(draw):
    flaw = _flaw(draw, ["s-0", "s-negative", "s-above", "x-double", "dictionary-half", "atom-long", "atom-nan"])
    k, d = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    most = min(k, d)
    g = draw(st.integers(1, 3)) if flaw in ("atom-long", "atom-nan") else draw(st.integers(0, 3))
    return dict(
        flaw=flaw,
        g=g,
        m=draw(st.integers(0, 6)),
        k=k,
        d=d,
        s=_pick(draw, flaw, {"s-0": 0, "s-negative": -1, "s-above": most + 1}, st.integers(1, most)),
        signals=draw(st.sampled_from(["normal", "sparse", "zeros", "atom"])),
        duplicate_atoms=draw(st.booleans()),
        atom_scale=_pick(draw, flaw, {"atom-long": 1.01, "atom-nan": float("nan")}, st.sampled_from([1.0, 1.0005])),
        x_dtype=torch.float64 if flaw == "x-double" else torch.float32,
        d_dtype=torch.float16 if flaw == "dictionary-half" else torch.float32,
        x_layout=draw(LAYOUTS),
        d_layout=draw(st.sampled_from(["contiguous", "transposed", "row-strided", "column-slice"])),
        poison=draw(POISONS),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def run_omp_case(case: dict, device: str) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    g, m, k, d, s = case["g"], case["m"], case["k"], case["d"], case["s"]
    atoms = torch.randn(g, k, d, generator=gen, dtype=torch.float64)
    if case["duplicate_atoms"] and k >= 2:
        atoms[:, -1] = -atoms[:, 0]  # an atom linearly dependent on another
    atoms = atoms / atoms.norm(dim=-1, keepdim=True)
    if g and case["atom_scale"] != 1.0:
        atoms[g - 1, k - 1] *= case["atom_scale"]
    kind = case["signals"]
    if kind == "normal":
        x_values = torch.randn(g, m, d, generator=gen, dtype=torch.float64)
    elif kind == "zeros":
        x_values = torch.zeros(g, m, d, dtype=torch.float64)
    else:  # exact combinations of atoms: one atom, or a few
        used = 1 if kind == "atom" else min(k, 2)
        pick = torch.randint(0, k, (g, m, used), generator=gen)
        weights = torch.randn(g, m, used, generator=gen, dtype=torch.float64) + 2.0
        x_values = (
            weights[..., None]
            * torch.gather(atoms.nan_to_num(), 1, pick.reshape(g, m * used, 1).expand(g, m * used, d)).reshape(
                g, m, used, d
            )
        ).sum(2)
    x = _materialise(x_values, case["x_dtype"], case["x_layout"], device)
    dictionary = _materialise(atoms, case["d_dtype"], case["d_layout"], device)
    poisoned = case["x_layout"] != "expanded" and x.dtype == torch.float32 and _poison(x, case["poison"], gen)
    context = f"omp case {case} on {device}"
    call = lambda: fastad.ops.omp(x, dictionary, s)  # noqa: E731
    problems = set()
    if x.dtype != torch.float32 or dictionary.dtype != torch.float32:
        problems.add(TypeError)
    if not 1 <= s <= min(k, d):
        problems.add(ValueError)
    norms = atoms.norm(dim=-1)
    if g and m >= 0 and not bool(((norms - 1).abs() <= 1e-3).all()):
        problems.add(ValueError)  # atoms not of unit norm (NaN included) are refused
    if problems:
        if (
            ValueError in problems
            and problems == {ValueError}
            and g
            and not bool(((norms - 1).abs() <= 1e-3).all())
            and 1 <= s <= min(k, d)
        ):
            # The unit-norm check names the atom.
            try:
                call()
            except ValueError as exc:
                assert f"for atom {k - 1} of group {g - 1}" in str(exc), context
                return
            raise AssertionError(context + ": non-unit atoms accepted")
        _expect_error(call, problems, context)
        return
    indices, coefs = call()
    assert indices.shape == coefs.shape == (g, m, s), context
    assert indices.dtype == torch.int64 and coefs.dtype == torch.float32, context
    indices, coefs = indices.cpu(), coefs.cpu()
    assert bool(((indices >= -1) & (indices < k)).all()), context
    if poisoned or g * m == 0:
        return
    x32, d32 = x.cpu().float(), dictionary.cpu().float()
    expected_indices, _ = sklearn_omp(x32, d32, s, np.float32)
    ours, theirs = canonical(indices.numpy(), d32), canonical(expected_indices, d32)
    for gi, mi in zip(*np.nonzero((ours != theirs).any(-1)), strict=True):  # supports differ only at near-ties
        assert is_near_tie(x32, d32, gi, mi, ours[gi, mi], theirs[gi, mi]), (
            f"{context}: support {ours[gi, mi]} vs {theirs[gi, mi]}"
        )
    # The coefficients are the least-squares fit on the support chosen. Compared through the
    # reconstruction, which is well conditioned even where the coefficients are not (s = d atoms).
    for gi in range(g):
        for mi in range(m):
            support = [int(a) for a in indices[gi, mi] if a >= 0]
            if not support:
                continue
            atoms, signal = d32[gi, support].double(), x32[gi, mi].double()
            best = torch.linalg.lstsq(atoms.T, signal.unsqueeze(1)).solution.squeeze(1)
            ours_fit = atoms.T @ coefs[gi, mi, : len(support)].double()
            error = float((ours_fit - atoms.T @ best).norm())
            # A float32 solve of the normal equations is off by about eps32 * cond(atoms)^2 of the
            # signal: nearly parallel atoms (s = d = k draws them) widen the bound with it.
            cond = float(torch.linalg.cond(atoms))
            bound = (1e-4 + 10 * torch.finfo(torch.float32).eps * cond**2) * float(signal.norm()) + 1e-5
            assert error <= bound, f"{context}: signal ({gi}, {mi}) fit off by {error} (bound {bound}, cond {cond:.3g})"


def check_omp(device: str) -> dict[str, int]:
    return _search(omp_cases(), run_omp_case, device)

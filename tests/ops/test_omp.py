"""fastad.ops.omp against scikit-learn's orthogonal_mp_gram and the float64 lstsq OMP in
fastad.reference, on fresh random problems; fastad.ops.omp_reconstruct against a direct sum.

scikit-learn gets Gram = D D^T and Xy = D x in float64 from the same float32 values. Supports must
agree exactly and in order, coefficients within TOL. Two kinds of disagreement are tolerated
explicitly, never by loosening the comparison: a choice between exactly equal atoms (duplicates:
indices are compared through a canonical representative) and a near-tie, where fastad's float32
correlations pick an atom whose float64 correlation is within NEAR_TIE of the best (checked, and
only a few signals may need it).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fastad
from fastad import reference

TOL = 1e-4
NEAR_TIE = 1e-4  # relative gap of |correlation| below which float32 rounding may decide


def unit_atoms(g: int, k: int, d: int, gen: torch.Generator) -> torch.Tensor:
    atoms = torch.randn(g, k, d, generator=gen)
    return atoms / atoms.norm(dim=-1, keepdim=True)


def sklearn_omp(x: torch.Tensor, dictionary: torch.Tensor, s: int, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's supports in selection order and coefficients, (G, M, s) each (-1 / 0 unused),
    from orthogonal_mp_gram's coefficient path (column t has the first t + 1 atoms non-zero).
    Gram and Xy are computed in float64 and given to it in `dtype`, which sets its thresholds."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    g_size, m_size, _ = x.shape
    k = dictionary.shape[1]
    indices = np.full((g_size, m_size, s), -1, dtype=np.int64)
    coefs = np.zeros((g_size, m_size, s))
    for g in range(g_size):
        atoms = dictionary[g].double().numpy()
        gram, xy = (atoms @ atoms.T).astype(dtype), (atoms @ x[g].double().numpy().T).astype(dtype)
        for m in range(m_size):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # scikit-learn warns on every early stop
                path = linear_model.orthogonal_mp_gram(gram, xy[:, m], n_nonzero_coefs=s, return_path=True)
            path = np.asarray(path).reshape(k, -1)
            order: list[int] = []
            for step in range(path.shape[1]):
                order += [a for a in np.flatnonzero(path[:, step]) if a not in order]
            indices[g, m, : len(order)] = order
            if order:
                coefs[g, m, : len(order)] = path[order, -1]
    return indices, coefs


def canonical(indices: np.ndarray, dictionary: torch.Tensor) -> np.ndarray:
    """Each index replaced by the lowest index of an identical atom in its group."""
    out = indices.copy()
    for g in range(dictionary.shape[0]):
        same = (dictionary[g][:, None] == dictionary[g][None]).all(-1).numpy()
        first = same.argmax(1)
        mask = out[g] >= 0
        out[g][mask] = first[out[g][mask]]
    return out


def is_near_tie(x, dictionary, g, m, ours, theirs) -> bool:
    """Whether, at the first step where the supports part, fastad's atom correlates with the
    float64 residual (after least squares on the common prefix) within NEAR_TIE of the best."""
    step = int(np.argmax(ours != theirs))
    prefix = [int(a) for a in ours[:step]]
    atoms, signal = dictionary[g].double(), x[g, m].double()
    residual = signal
    if prefix:
        gamma = torch.linalg.lstsq(atoms[prefix].T, signal.unsqueeze(1)).solution.squeeze(1)
        residual = signal - atoms[prefix].T @ gamma
    scores = (atoms @ residual).abs()
    best = float(scores.max())
    mine = float(scores[ours[step]]) if ours[step] >= 0 else 0.0
    return best - mine <= NEAR_TIE * best or best**2 < 10 * torch.finfo(torch.float32).eps


def assert_same_omp(x, dictionary, s, indices, coefs, expected_indices, expected_coefs, max_near_ties=0.1):
    ours, theirs = canonical(indices.numpy(), dictionary), canonical(expected_indices, dictionary)
    differs = (ours != theirs).any(-1)
    for g, m in zip(*np.nonzero(differs), strict=True):
        assert is_near_tie(x, dictionary, g, m, ours[g, m], theirs[g, m]), (
            f"group {g} signal {m}: support {ours[g, m]} vs {theirs[g, m]}"
        )
    assert differs.mean() <= max_near_ties, f"{differs.sum()} of {differs.size} supports differ"
    same = ~differs
    np.testing.assert_allclose(coefs.numpy()[same], expected_coefs[same], rtol=TOL, atol=TOL)


# (G, M, K, d, s)
SHAPES = [
    (1, 40, 30, 16, 1),  # s = 1
    (3, 25, 20, 8, 8),  # s = d
    (2, 30, 6, 16, 6),  # K < d, s = K
    (4, 15, 64, 32, 5),
    (5, 12, 5, 64, 3),  # MLF-SC's shape, fewer groups
    (1, 3, 1, 1, 1),
    (2, 20, 100, 24, 6),  # K > 78: the CUDA kernel reads the Gram from global memory, not shared
]


@pytest.mark.parametrize("g,m,k,d,s", SHAPES, ids=[f"G{g}-M{m}-K{k}-d{d}-s{s}" for g, m, k, d, s in SHAPES])
def test_matches_sklearn(g, m, k, d, s, device, rng):
    dictionary, x = unit_atoms(g, k, d, rng), torch.randn(g, m, d, generator=rng)
    indices, coefs = fastad.ops.omp(x.to(device), dictionary.to(device), s)
    assert indices.device.type == coefs.device.type == torch.device(device).type
    indices, coefs = indices.cpu(), coefs.cpu()
    assert indices.shape == coefs.shape == (g, m, s)
    assert indices.dtype == torch.int64 and coefs.dtype == torch.float32
    assert_same_omp(x, dictionary, s, indices, coefs, *sklearn_omp(x, dictionary, s))


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_matches_float64_reference(isa, device, rng, monkeypatch):
    if device != "cpu" and isa != "avx2":
        pytest.skip("the instruction-set switch is a CPU kernel knob")
    monkeypatch.setenv("FASTAD_OMP_CPU_ISA", isa)
    dictionary, x = unit_atoms(3, 37, 12, rng), torch.randn(3, 21, 12, generator=rng)  # K not a multiple of 4
    indices, coefs = (t.cpu() for t in fastad.ops.omp(x.to(device), dictionary.to(device), 7))
    ref_indices, ref_coefs = reference.omp(x, dictionary, 7)
    assert_same_omp(x, dictionary, 7, indices, coefs, ref_indices.numpy(), ref_coefs.double().numpy())


def test_early_stops(device, rng):
    # Zero signals stop at step 0, 2-sparse signals after 2 atoms, a multiple of an atom that has a
    # duplicate after 1. These signals are sparse up to float32 rounding, so scikit-learn gets
    # float32 data: its thresholds are then those of the contract (float64 ones would have it fit
    # the rounding noise).
    g, k, d, s = 2, 24, 48, 6
    dictionary = unit_atoms(g, k, d, rng)
    dictionary[:, 7] = dictionary[:, 2]  # duplicate atoms
    x = torch.randn(g, 12, d, generator=rng)
    x[:, :3] = 0.0
    picks = torch.stack([torch.randperm(k - 1, generator=rng)[:2] for _ in range(g * 4)]).reshape(g, 4, 2)
    picks[picks >= 7] += 1  # never the duplicate
    weights = 1.0 + torch.rand(g, 4, 2, generator=rng)
    chosen = torch.gather(dictionary, 1, picks.reshape(g, 8, 1).expand(g, 8, d)).reshape(g, 4, 2, d)
    x[:, 3:7] = (weights.unsqueeze(-1) * chosen).sum(2)
    x[:, 7] = dictionary[:, 2] * 3.0  # one atom that has a duplicate
    indices, coefs = (t.cpu() for t in fastad.ops.omp(x.to(device), dictionary.to(device), s))
    assert (indices[:, :3] == -1).all() and (coefs[:, :3] == 0).all()
    # OMP need not find a 2-sparse support (a third atom may correlate better); when it does, it stops.
    found = (indices[:, 3:7, :2].sort(-1).values == picks.sort(-1).values).all(-1)
    assert found.float().mean() >= 0.5
    assert (indices[:, 3:7, 2:][found] == -1).all()
    assert (indices[:, 7, 1:] == -1).all() and set(indices[:, 7, 0].tolist()) <= {2, 7}
    assert_same_omp(x, dictionary, s, indices, coefs, *sklearn_omp(x, dictionary, s, np.float32))
    ref_indices, ref_coefs = reference.omp(x, dictionary, s)
    assert_same_omp(x, dictionary, s, indices, coefs, ref_indices.numpy(), ref_coefs.double().numpy())


def test_duplicate_atoms_dependence(device, rng):
    # Three atoms, the third a copy of the first, and a generic signal: two atoms explain its
    # projection onto their plane, then only dependent or already used atoms remain (a large
    # signal, so that the residual's rounding-level correlations pass the eps test and the
    # "selected twice" / dependence rules decide).
    base = unit_atoms(1, 2, 5, rng)
    dictionary = torch.cat([base, base[:, :1]], 1)
    x = torch.randn(1, 10, 5, generator=rng) * torch.tensor([1.0, 1e4]).repeat(5)[:, None]
    indices, coefs = (t.cpu() for t in fastad.ops.omp(x.to(device), dictionary.to(device), 3))
    assert (indices[..., 2] == -1).all()
    assert_same_omp(x, dictionary, 3, indices, coefs, *sklearn_omp(x, dictionary, 3))


def test_reconstruction(rng):
    dictionary, x = unit_atoms(3, 20, 10, rng), torch.randn(3, 9, 10, generator=rng)
    indices, coefs = fastad.ops.omp(x, dictionary, 4)
    indices[0, 0, 3], coefs[0, 0, 3] = -1, 0.0  # an unused slot
    recon = fastad.ops.omp_reconstruct(indices, coefs, dictionary)
    expected = torch.zeros_like(x, dtype=torch.float64)
    for g in range(3):
        for m in range(9):
            for t in range(4):
                if indices[g, m, t] >= 0:
                    expected[g, m] += float(coefs[g, m, t]) * dictionary[g, indices[g, m, t]].double()
    torch.testing.assert_close(recon.double(), expected, rtol=1e-5, atol=1e-5)
    error = fastad.ops.omp_error(x, indices, coefs, dictionary)
    assert error.shape == (3, 9)
    torch.testing.assert_close(error.double(), (x.double() - expected).square().sum(-1), rtol=1e-4, atol=1e-5)
    # Least squares on the support: the residual is orthogonal to the atoms used.
    full = fastad.ops.omp(x, dictionary, 4)
    residual = x - fastad.ops.omp_reconstruct(*full, dictionary)
    used = torch.gather(dictionary, 1, full[0].reshape(3, 36, 1).expand(3, 36, 10)).reshape(3, 9, 4, 10)
    assert (used @ residual.unsqueeze(-1)).abs().max() < 1e-4
    assert ((residual**2).sum(-1) <= (x**2).sum(-1)).all()


@pytest.mark.parametrize("g,m", [(0, 5), (3, 0), (0, 0)])
def test_empty(g, m):
    indices, coefs = fastad.ops.omp(torch.ones(g, m, 4), torch.eye(4).expand(g, 4, 4), 2)
    assert indices.shape == coefs.shape == (g, m, 2)
    assert fastad.ops.omp_reconstruct(indices, coefs, torch.eye(4).expand(g, 4, 4)).shape == (g, m, 4)


def test_non_contiguous_inputs(rng):
    dictionary, x = unit_atoms(2, 16, 8, rng), torch.randn(2, 11, 8, generator=rng)
    expected = fastad.ops.omp(x, dictionary, 3)
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)
    d_t = dictionary.transpose(0, 2).contiguous().transpose(0, 2)
    for a, b in zip(fastad.ops.omp(x_t, d_t, 3), expected, strict=True):
        assert torch.equal(a, b)


def test_nearly_unit_atoms_accepted(rng):
    # Atoms 1.01 long are refused (tests/ops/error_cases.py); 1 + 5e-4 is within the tolerance.
    dictionary = unit_atoms(2, 6, 8, rng) * (1 + 5e-4)
    fastad.ops.omp(torch.randn(2, 3, 8, generator=rng), dictionary, 2)


def test_cuda_edge_cases(device, rng):
    # The CUDA-only paths: empty shapes, non-contiguous inputs, and opcheck on the device (its
    # device-side unit-norm check is among tests/ops/error_cases.py).
    if device == "cpu":
        pytest.skip("the CPU kernel's cases are the tests above")
    dictionary = unit_atoms(2, 6, 8, rng).to(device)
    x = torch.randn(2, 3, 8, generator=rng).to(device)
    for g, m in [(0, 5), (3, 0), (0, 0)]:
        atoms = torch.eye(4, device=device).expand(g, 4, 4)
        indices, coefs = fastad.ops.omp(torch.ones(g, m, 4, device=device), atoms, 2)
        assert indices.shape == coefs.shape == (g, m, 2) and indices.device.type == "cuda"
    expected = fastad.ops.omp(x, dictionary, 3)
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)
    d_t = dictionary.transpose(0, 2).contiguous().transpose(0, 2)
    for a, b in zip(fastad.ops.omp(x_t, d_t, 3), expected, strict=True):
        assert torch.equal(a, b)
    for g, m, k, d, s in [(2, 7, 9, 5, 3), (1, 4, 3, 8, 3), (2, 0, 3, 4, 1)]:
        x, dictionary = torch.randn(g, m, d, generator=rng), unit_atoms(g, k, d, rng)
        torch.library.opcheck(torch.ops.fastad.omp.default, (x.to(device), dictionary.to(device), s))


def test_opcheck(rng):
    for g, m, k, d, s in [(2, 7, 9, 5, 3), (1, 4, 3, 8, 3), (0, 2, 3, 4, 2), (2, 0, 3, 4, 1)]:
        x, dictionary = torch.randn(g, m, d, generator=rng), unit_atoms(g, k, d, rng)
        torch.library.opcheck(torch.ops.fastad.omp.default, (x, dictionary, s))


def test_torch_compile_fullgraph(rng):
    @torch.compile(fullgraph=True)
    def reconstruction_error(x, dictionary):
        indices, coefs = fastad.ops.omp(x, dictionary, 3)
        return (x - fastad.ops.omp_reconstruct(indices, coefs, dictionary)).square().sum(-1)

    x, dictionary = torch.randn(2, 6, 8, generator=rng), unit_atoms(2, 10, 8, rng)
    indices, coefs = fastad.ops.omp(x, dictionary, 3)
    expected = (x - fastad.ops.omp_reconstruct(indices, coefs, dictionary)).square().sum(-1)
    torch.testing.assert_close(reconstruction_error(x, dictionary), expected)


@pytest.mark.parametrize(
    "case",
    ["one-dictionary-K512", "per-position-K5", "shared-gram-K78", "duplicate-atoms", "early-stops", "s-equals-d"],
)
def test_the_warp_cuda_path_codes_what_the_thread_path_does_bit_for_bit(case, device, rng, monkeypatch):
    """The warp path splits each signal's correlation update and argmax over 32 lanes; every
    correlation is the same chain of fused multiply-adds and the first atom at the exact maximum
    wins, so its codes must equal the thread path's exactly: with the Gram in global and in shared
    memory, exact ties (duplicate atoms), early stops (a signal in the span of few atoms) and
    s = d."""
    if device != "cuda":
        pytest.skip("the thread / warp switch is a CUDA kernel knob")
    if case == "one-dictionary-K512":
        dictionary, x, s = unit_atoms(1, 512, 64, rng), torch.randn(1, 3000, 64, generator=rng), 5
    elif case == "per-position-K5":
        dictionary, x, s = unit_atoms(300, 5, 64, rng), torch.randn(300, 121, 64, generator=rng), 3
    elif case == "shared-gram-K78":
        dictionary, x, s = unit_atoms(3, 78, 40, rng), torch.randn(3, 700, 40, generator=rng), 8
    elif case == "duplicate-atoms":
        base = unit_atoms(2, 40, 16, rng)
        dictionary, x, s = torch.cat([base, base[:, :10]], 1), torch.randn(2, 500, 16, generator=rng), 6
    elif case == "early-stops":
        dictionary = unit_atoms(1, 50, 20, rng)
        x, s = 3.0 * dictionary[:, torch.randint(0, 50, (400,), generator=rng)], 4  # one atom each
    else:
        dictionary, x, s = unit_atoms(2, 33, 7, rng), torch.randn(2, 257, 7, generator=rng), 7
    x, dictionary = x.to(device), dictionary.to(device)
    thread = fastad.ops.omp(x, dictionary, s)
    monkeypatch.setenv("FASTAD_OMP_CUDA_PATH", "warp")
    warp = fastad.ops.omp(x, dictionary, s)
    assert torch.equal(thread[0], warp[0]), f"{case}: the supports differ"
    assert torch.equal(thread[1], warp[1]), f"{case}: the coefficients differ"


def test_an_unknown_omp_cuda_path_is_refused(device, rng, monkeypatch):
    if device != "cuda":
        pytest.skip("the thread / warp switch is a CUDA kernel knob")
    monkeypatch.setenv("FASTAD_OMP_CUDA_PATH", "block")
    dictionary = unit_atoms(1, 6, 4, rng).to(device)
    with pytest.raises(ValueError, match="FASTAD_OMP_CUDA_PATH must be thread or warp, got 'block'"):
        fastad.ops.omp(torch.randn(1, 3, 4, device=device), dictionary, 2)

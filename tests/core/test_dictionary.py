"""fastad.dictionary.DictionaryLearner: one mini-batch step against a float64 per-group loop of
Mairal et al.'s update, quality against scikit-learn's MiniBatchDictionaryLearning fitted per
group, fit == partial_fit on the same batches, determinism, re-drawing of unused atoms, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fastad import ops
from fastad.dictionary import DictionaryLearner, forgetting_factor


def hidden_dictionary_data(groups: int, n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """(G, N, d) signals: 3 of 8 hidden unit atoms per signal with N(0, 2^2) weights, plus noise."""
    atoms = torch.randn(groups, 8, d, generator=gen)
    atoms /= atoms.norm(dim=-1, keepdim=True)
    support = torch.rand(groups, n, 8, generator=gen).argsort(-1)[..., :3]
    codes = torch.zeros(groups, n, 8).scatter_(2, support, 2 * torch.randn(groups, n, 3, generator=gen))
    return codes @ atoms + 0.1 * torch.randn(groups, n, d, generator=gen)


def reference_step(x, dictionary, A, B, step, n_nonzero):
    """One partial_fit step for each group in float64 numpy, atom by atom: OMP codes, scikit-learn's
    forgetting, block coordinate descent with unit renormalisation, unused atoms taken from the
    worst-reconstructed signals in order. Returns the new (G, K, d) dictionary."""
    idx, coef = ops.omp(x, dictionary, n_nonzero)  # ops.omp is tested against scikit-learn itself
    x, D, A, B = (t.double().numpy().copy() for t in (x, dictionary, A, B))
    idx, coef = idx.numpy(), coef.double().numpy()
    g_count, b, _ = x.shape
    k_count = D.shape[1]
    beta = forgetting_factor(step, b)
    out = np.empty_like(D)
    for g in range(g_count):
        code = np.zeros((b, k_count))
        for m in range(b):
            for t in range(n_nonzero):
                if idx[g, m, t] >= 0:
                    code[m, idx[g, m, t]] += coef[g, m, t]
        a = beta * A[g] + code.T @ code / b
        bs = beta * B[g] + code.T @ x[g] / b
        errors = ((x[g] - code @ D[g]) ** 2).sum(1)
        worst = list(np.argsort(-errors, kind="stable"))
        atoms = D[g].copy()
        for k in range(k_count):
            if a[k, k] <= 1e-6:
                atoms[k] = x[g][worst.pop(0)]
            else:
                atoms[k] = atoms[k] + (bs[k] - a[k] @ atoms) / a[k, k]
            atoms[k] /= np.linalg.norm(atoms[k])
        out[g] = atoms
    return out


def test_step_matches_float64_reference():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 300, 16, generator=gen)
    learner = DictionaryLearner(6, 5, 16, 2, seed=3)
    for batch in (x[:, :100], x[:, 100:200]):
        learner.partial_fit(batch)
    state = (learner.dictionary_.clone(), learner._A.clone(), learner._B.clone(), learner.n_steps_)
    learner.partial_fit(x[:, 200:])
    expected = reference_step(x[:, 200:], state[0], state[1], state[2], state[3], 2)
    np.testing.assert_allclose(learner.dictionary_.double().numpy(), expected, atol=2e-4)


def test_unused_atoms_take_the_worst_reconstructed_signals():
    eye = torch.eye(16)
    learner = DictionaryLearner(1, 5, 16, 1)
    # Start from known atoms e0..e4 with empty statistics (as after initialisation, before a step).
    learner.dictionary_ = eye[:5].clone().unsqueeze(0)
    learner._A, learner._B = torch.zeros(1, 5, 5), torch.zeros(1, 5, 16)
    # Only atom 0 codes anything; e5, e7, e8 are orthogonal to every atom (errors 1, 4, 9).
    batch = torch.stack([3 * eye[0], 3 * eye[0], 2 * eye[7], 3 * eye[8], eye[5]]).unsqueeze(0)
    learner.partial_fit(batch)
    atoms = learner.dictionary_[0]
    torch.testing.assert_close(atoms[:4], torch.stack([eye[0], eye[8], eye[7], eye[5]]))
    assert learner.n_steps_ == 1


@pytest.mark.parametrize("data", ["hidden dictionary", "gaussian"])
def test_quality_matches_scikit_learn(data):
    sklearn_decomposition = pytest.importorskip("sklearn.decomposition")
    gen = torch.Generator().manual_seed(7)
    groups, k, d, s, n_train, batch, epochs = 3, 5, 64, 3, 1200, 128, 2
    x = (
        hidden_dictionary_data(groups, n_train + 400, d, gen)
        if data == "hidden dictionary"
        else torch.randn(groups, n_train + 400, d, generator=gen)
    )
    train, held_out = x[:, :n_train], x[:, n_train:]
    learner = DictionaryLearner(groups, k, d, s, batch_size=batch, seed=0).fit(train, epochs=epochs)
    ours = learner.reconstruction_error(held_out)
    # The same value from the codes: the error is the OMP reconstruction's, in float64.
    idx, coef = learner.transform(held_out)
    rebuilt = ops.omp_reconstruct(idx, coef.double(), learner.dictionary_.double())
    torch.testing.assert_close(ours.double(), (held_out.double() - rebuilt).square().sum(-1), rtol=1e-4, atol=1e-4)
    theirs = []
    for g in range(groups):
        model = sklearn_decomposition.MiniBatchDictionaryLearning(
            n_components=k,
            fit_algorithm="cd",
            transform_algorithm="omp",
            transform_n_nonzero_coefs=s,
            batch_size=batch,
            max_iter=epochs,
            random_state=0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its convergence chatter
            model.fit(train[g].numpy())
        code = model.transform(held_out[g].numpy())
        theirs.append(((held_out[g].numpy() - code @ model.components_) ** 2).sum(1).mean())
    assert ours.mean().item() <= 1.05 * float(np.mean(theirs))


def test_fit_is_partial_fit_on_the_same_batches_and_deterministic():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 250, 12, generator=gen)  # 250 = 2 full batches of 100 and one of 50
    fitted = DictionaryLearner(4, 6, 12, 3, batch_size=100, seed=5).fit(x, epochs=2, shuffle=False)
    stepped = DictionaryLearner(4, 6, 12, 3, batch_size=100, seed=5)
    for _ in range(2):
        for start in (0, 100, 200):
            stepped.partial_fit(x[:, start : start + 100])
    torch.testing.assert_close(fitted.dictionary_, stepped.dictionary_, rtol=0, atol=0)
    assert fitted.n_steps_ == stepped.n_steps_ == 6
    again = DictionaryLearner(4, 6, 12, 3, batch_size=100, seed=5)
    first = again.fit(x).dictionary_.clone()
    torch.testing.assert_close(again.fit(x).dictionary_, first, rtol=0, atol=0)  # fit restarts
    other = DictionaryLearner(4, 6, 12, 3, batch_size=100, seed=6).fit(x).dictionary_
    assert not torch.equal(other, first)
    norms = first.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert first.dtype == torch.float32 and first.shape == (4, 6, 12)


@pytest.mark.parametrize(
    "batch",
    [
        torch.randn(3, 1, 8),  # fewer signals than atoms
        torch.zeros(3, 4, 8),  # nothing to draw a direction from
    ],
)
def test_degenerate_first_batches_give_unit_atoms(batch):
    learner = DictionaryLearner(3, 5, 8, 2).partial_fit(batch).partial_fit(torch.randn(3, 2, 8))
    assert torch.isfinite(learner.dictionary_).all()
    torch.testing.assert_close(learner.dictionary_.norm(dim=-1), torch.ones(3, 5))
    err = learner.reconstruction_error(torch.randn(3, 7, 8))
    assert err.shape == (3, 7) and bool((err >= -1e-4).all())


def test_forgetting_factor_matches_scikit_learn():
    sklearn_decomposition = pytest.importorskip("sklearn.decomposition")
    model = sklearn_decomposition.MiniBatchDictionaryLearning(n_components=2)
    for step, batch in [(0, 4), (2, 4), (3, 4), (10, 4), (5, 1), (0, 256), (300, 256)]:
        model._A, model._B = np.ones((2, 2)), np.zeros((3, 2))
        model._update_inner_stats(np.zeros((batch, 3)), np.zeros((batch, 2)), batch, step)
        assert model._A[0, 0] == pytest.approx(forgetting_factor(step, batch))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(groups=0), ValueError),
        (dict(n_atoms=2.0), TypeError),
        (dict(dim=True), TypeError),
        (dict(n_nonzero=6), ValueError),
        (dict(n_atoms=8, dim=4, n_nonzero=5), ValueError),
        (dict(batch_size=0), ValueError),
        (dict(seed=-1), ValueError),
        (dict(device="nope"), ValueError),
    ],
)
def test_bad_parameters(kwargs, error):
    params = dict(groups=2, n_atoms=5, dim=8, n_nonzero=3) | kwargs
    with pytest.raises(error, match=next(iter(kwargs))):
        DictionaryLearner(**params)


def test_bad_signals():
    learner = DictionaryLearner(2, 5, 8, 3)
    with pytest.raises(RuntimeError, match="not fitted"):
        learner.transform(torch.randn(2, 3, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        learner.partial_fit(np.zeros((2, 3, 8), dtype=np.float32))
    with pytest.raises(TypeError, match="float32"):
        learner.partial_fit(torch.randn(2, 3, 8, dtype=torch.float64))
    for shape in [(2, 3), (3, 3, 8), (2, 3, 7), (2, 0, 8)]:
        with pytest.raises(ValueError, match=r"x must (have shape \(G, M, d\)|hold at least one signal)"):
            learner.partial_fit(torch.randn(shape))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 3, 8)
        x[1, 2, 5] = bad
        with pytest.raises(ValueError, match="finite"):
            learner.fit(x)
    with pytest.raises(ValueError, match="epochs"):
        learner.fit(torch.randn(2, 3, 8), epochs=0)
    learner.fit(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"\(G, M, d\)"):
        learner.reconstruction_error(torch.randn(2, 3, 9))

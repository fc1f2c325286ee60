"""Mini-batch dictionary learning at MLF-SC's shape: fastad.dictionary.DictionaryLearner against
scikit-learn's MiniBatchDictionaryLearning fitted group by group.

G = 896 groups (one per feature channel), K = 5 atoms of d = 64 features, s = 3 non-zeros,
N = 121 * 40 training patches per group, mini-batches of 256, one pass. fastad learns all groups
at once with its OMP coder; scikit-learn fits one model per group (coordinate-descent lasso coder,
fit_algorithm="cd", OMP transform), which is how it would be used here. scikit-learn is timed on
the first SKLEARN_GROUPS groups and the time scaled by G / SKLEARN_GROUPS (its per-group cost does
not depend on the group), which the summary's row name says. No floating-point count: the work is
many small steps, not one kernel.
Run with `pytest benchmarks/test_bench_dictionary.py --benchmark-only`.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fastad.dictionary import DictionaryLearner

SKLEARN_GROUPS = 8
G, K, D, S, N, BATCH, EPOCHS = 896, 5, 64, 3, 121 * 40, 256, 1


def make_signals() -> torch.Tensor:
    return torch.randn(G, N, D, generator=torch.Generator().manual_seed(0))


def fastad_fit(x: torch.Tensor) -> DictionaryLearner:
    return DictionaryLearner(G, K, D, S, batch_size=BATCH, seed=0).fit(x, epochs=EPOCHS)


def sklearn_fit(x: torch.Tensor, groups: int) -> list:
    from sklearn.decomposition import MiniBatchDictionaryLearning

    models = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g in range(groups):
            model = MiniBatchDictionaryLearning(
                n_components=K,
                fit_algorithm="cd",
                transform_algorithm="omp",
                transform_n_nonzero_coefs=S,
                batch_size=BATCH,
                max_iter=EPOCHS,
                random_state=0,
            )
            models.append(model.fit(x[g].numpy()))
    return models


@pytest.mark.parametrize("contender", ["fastad DictionaryLearner", "scikit-learn MiniBatchDictionaryLearning"])
def test_dictionary_learning_cpu(benchmark, record, contender):
    x = make_signals()
    benchmark.group = f"dictionary learning cpu G={G} N={N} K={K} d={D} s={S} batch={BATCH} epochs={EPOCHS}"
    if contender.startswith("fastad"):
        benchmark.pedantic(fastad_fit, args=(x,), rounds=3, iterations=1, warmup_rounds=1)
        record(benchmark, benchmark.group, contender, 0.0)
        return
    pytest.importorskip("sklearn")
    benchmark.pedantic(sklearn_fit, args=(x, SKLEARN_GROUPS), rounds=3, iterations=1)
    benchmark.stats.stats.data[:] = [t * G / SKLEARN_GROUPS for t in benchmark.stats.stats.data]
    record(benchmark, benchmark.group, f"{contender} (x{G / SKLEARN_GROUPS:.0f} of {SKLEARN_GROUPS} groups)", 0.0)

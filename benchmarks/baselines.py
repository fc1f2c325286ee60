"""The ways people do what fastad's kernels do without fastad (nearest neighbours, greedy coresets,
Mahalanobis distances), as benchmark contenders."""

from __future__ import annotations

import torch


def cdist_topk(query, bank, k):
    """torch.cdist then topk: the full M x N matrix at once."""
    return torch.cdist(query, bank).topk(k, dim=1, largest=False)


def chunked_matmul_topk(query, bank, k, chunk=4096):
    """anomalib's way: |q|^2 - 2 q b^T + |b|^2 by matmul, clamp, sqrt, topk; chunked over query
    rows here so that memory stays bounded."""
    bank_sq = bank.square().sum(1)
    dists, idxs = [], []
    for start in range(0, query.shape[0], chunk):
        q = query[start : start + chunk]
        d2 = q.square().sum(1, keepdim=True) - 2.0 * q @ bank.T + bank_sq
        top = d2.clamp_min_(0).sqrt_().topk(k, dim=1, largest=False)
        dists.append(top.values)
        idxs.append(top.indices)
    return torch.cat(dists), torch.cat(idxs)


def faiss_flat_l2(bank):
    """faiss-cpu IndexFlatL2 (BLAS GEMM + its own selection) over ``bank``, built here, once: the
    returned ``search(query, k)`` gives squared distances and indices. Benchmarks build the index
    outside the timed call, as a model would at fit."""
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.numpy())
    return lambda query, k: index.search(query.numpy(), k)


def anomalib_kcenter_greedy(x, k, start=0):
    """Greedy k-center the way anomalib's coreset sampler (KCenterGreedy) runs it: every step
    measures all rows against the newest centre with torch.linalg.norm, folds that into a running
    minimum, and reads the argmax back to the host (.item()) to index the next centre; a chosen
    row's distance is set to 0 instead of being excluded. Returns the k rows chosen after
    `start` (anomalib leaves the random first row out of its result)."""
    nearest = None
    row = start
    chosen = []
    for _ in range(k):
        dist = torch.linalg.norm(x - x[row : row + 1], dim=1, keepdim=True)
        nearest = dist if nearest is None else torch.minimum(nearest, dist)
        row = int(torch.argmax(nearest).item())
        nearest[row] = 0
        chosen.append(row)
    return torch.tensor(chosen)


def anomalib_mahalanobis(x, mean, inv_covariance):
    """Squared Mahalanobis distances the way anomalib's PaDiM computes them: the features as its
    (B, D, P) embedding, centred by the (D, P) means, moved to (P, B, D), one batched matmul with
    the (P, D, D) inverse covariances, times the centred values again, summed over D. x (B, P, D),
    mean (P or 1, D), inv_covariance (P or 1, D, D); returns (B, P) (anomalib then takes the square
    root). It builds the (P, B, D) differences and their product with the full matrices."""
    embedding = x.permute(0, 2, 1)  # (B, D, P)
    delta = (embedding - mean.T).permute(2, 0, 1)  # (P, B, D)
    return (torch.matmul(delta, inv_covariance) * delta).sum(2).permute(1, 0)


def sklearn_omp_gram(grams, xys, n_nonzero, groups=None):
    """scikit-learn's orthogonal_mp_gram, one call per group, on precomputed Gram (G, K, K) and Xy
    (G, K, M) NumPy arrays (its API: the products are not part of its time); `groups` limits the
    call to the first so many groups. Returns the list of (K, M) dense coefficient arrays."""
    import warnings

    from sklearn.linear_model import orthogonal_mp_gram

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # early stops warn
        return [
            orthogonal_mp_gram(grams[g], xys[g], n_nonzero_coefs=n_nonzero)
            for g in range(len(grams) if groups is None else groups)
        ]


def sklearn_sparse_coder_omp(x, dictionary, n_nonzero, groups=None):
    """scikit-learn's `SparseCoder(transform_algorithm="omp")` per group on (G, M, d) signals and
    (G, K, d) atoms (NumPy): the estimator a user reaches for, which forms its own Gram matrix and
    correlations. `groups` limits it to the first so many groups. Returns the (M, K) codes."""
    import warnings

    from sklearn.decomposition import SparseCoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return [
            SparseCoder(dictionary[g], transform_algorithm="omp", transform_n_nonzero_coefs=n_nonzero).transform(x[g])
            for g in range(len(x) if groups is None else groups)
        ]

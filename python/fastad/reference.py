"""Pure-PyTorch versions of every fastad op: what each op means, the tests' oracle, and the
benchmarks' naive baseline. Computed in float64 by the definition; memory is not bounded here."""

from __future__ import annotations

import torch
from torch import Tensor


def knn(
    query: Tensor, bank: Tensor, k: int, *, squared: bool = False, prepared: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """k nearest bank rows of each query row: float64 sums of squared differences, sorted
    stably so that equal distances come in index order. ``prepared`` (see :func:`knn_prepare`)
    only saves the kernel work; the meaning is the same with or without it."""
    q, b = query.double(), bank.double()
    m, n, d = q.shape[0], b.shape[0], q.shape[1]
    rows = max(1, (1 << 24) // max(1, n * d))  # bound the (rows, N, D) difference tensor
    dists, idxs = [], []
    for start in range(0, m, rows):
        d2 = (q[start : start + rows, None, :] - b[None]).square().sum(-1)
        srt = torch.sort(d2, dim=1, stable=True)
        dists.append(srt.values[:, :k])
        idxs.append(srt.indices[:, :k])
    if m == 0:
        return q.new_empty((0, k)).float(), q.new_empty((0, k), dtype=torch.int64)
    dist = torch.cat(dists)
    return (dist if squared else dist.sqrt()).float(), torch.cat(idxs)


def knn_prepare(bank: Tensor) -> Tensor:
    """Nothing needs preparing for the definition: an empty uint8 tensor, which ``knn`` (this
    one and ``fastad.ops.knn``) accepts with any bank."""
    return torch.empty(0, dtype=torch.uint8, device=bank.device)


def kcenter_greedy(x: Tensor, k: int, *, start: int = 0) -> tuple[Tensor, Tensor]:
    """Greedy k-center (farthest-point) selection by its definition, in float64: keep every
    row's distance to its nearest selected row, and take the unselected row where it is largest
    (``argmax`` returns the first, i.e. lowest, index among equal values). Returns (indices (k,)
    int64, radii (k,) float32), radii[i] the distance of row indices[i] when it was taken."""
    n = x.shape[0]
    if not 1 <= k <= n or not 0 <= start < n:
        raise ValueError(f"need 1 <= k <= N and 0 <= start < N, got k={k}, start={start}, N={n}")
    xd = x.double()
    nearest = torch.full((n,), float("inf"), dtype=torch.float64, device=x.device)
    selected = torch.zeros(n, dtype=torch.bool, device=x.device)
    indices, radii = [start], [float("inf")]
    for _ in range(1, k):
        last = indices[-1]
        selected[last] = True
        nearest = torch.minimum(nearest, torch.linalg.vector_norm(xd - xd[last], dim=1))
        row = int(nearest.masked_fill(selected, -1.0).argmax())
        indices.append(row)
        radii.append(float(nearest[row]))
    return (
        torch.tensor(indices, dtype=torch.int64, device=x.device),
        torch.tensor(radii, dtype=torch.float32, device=x.device),
    )


def mahalanobis(x: Tensor, mean: Tensor, L: Tensor) -> Tensor:
    """Squared Mahalanobis distances by the definition, in float64: centre every sample at every
    position, multiply by the lower triangle of its position's factor (``torch.tril``: the upper
    triangle is ignored), sum the squares. x (B, P, D), mean (P or 1, D), L (P or 1, D, D) lower
    Cholesky factors of the precisions; returns (B, P) float32. Builds the (B, P, D) differences."""
    if x.dim() != 3 or mean.dim() != 2 or L.dim() != 3:
        raise ValueError(
            f"need x (B, P, D), mean (P or 1, D) and L (P or 1, D, D), got shapes "
            f"{tuple(x.shape)}, {tuple(mean.shape)} and {tuple(L.shape)}"
        )
    centred = x.double() - mean.double()  # (B, P, D); a shared mean broadcasts over positions
    factor = torch.tril(L.double())  # (Q, D, D); a shared factor broadcasts over positions
    projected = torch.einsum("bpi,pij->bpj", centred, factor.expand(x.shape[1], -1, -1))
    return projected.square().sum(-1).float()


def omp(x: Tensor, dictionary: Tensor, n_nonzero: int) -> tuple[Tensor, Tensor]:
    """Orthogonal Matching Pursuit by its definition, in float64, one signal at a time: the
    residual's correlation with every atom, the atom where it is largest in absolute value, then
    the least-squares fit of the signal on all selected atoms (``torch.linalg.lstsq``) gives the
    coefficients and the next residual. It stops early where fastad.ops.omp does (see
    ``csrc/ops/omp/omp.h``; eps = float32's machine epsilon): when the best atom is already
    selected (selected atoms win exact ties), when the best squared correlation is below eps, or
    when the best atom's squared distance to the span of the selected ones is at most eps. Exact
    ties among unselected atoms go to the lowest index. x (G, M, d), dictionary (G, K, d) with unit
    rows; returns (indices (G, M, s) int64 in selection order, -1 unused; coefs (G, M, s) float32)."""
    if x.dim() != 3 or dictionary.dim() != 3:
        raise ValueError(
            f"need x (G, M, d) and dictionary (G, K, d), got shapes {tuple(x.shape)} and {tuple(dictionary.shape)}"
        )
    eps = torch.finfo(torch.float32).eps
    g_size, m_size, _ = x.shape
    indices = torch.full((g_size, m_size, n_nonzero), -1, dtype=torch.int64)
    coefs = torch.zeros((g_size, m_size, n_nonzero), dtype=torch.float64)
    for g in range(g_size):
        atoms = dictionary[g].double().cpu()  # (K, d)
        for m in range(m_size):
            signal = x[g, m].double().cpu()
            support: list[int] = []
            gamma = signal.new_zeros(0)
            while len(support) < n_nonzero:
                residual = signal - atoms[support].T @ gamma
                scores = (atoms @ residual).abs()
                best = scores.max()
                tied = torch.nonzero(scores == best).flatten().tolist()
                if any(t in support for t in tied) or float(best) ** 2 < eps:
                    break
                lam = tied[0]
                if support:
                    basis = atoms[support].T  # (d, n)
                    fit = torch.linalg.lstsq(basis, atoms[lam].unsqueeze(1)).solution
                    if float((atoms[lam] - (basis @ fit).squeeze(1)).square().sum()) <= eps:
                        break
                support.append(lam)
                gamma = torch.linalg.lstsq(atoms[support].T, signal.unsqueeze(1)).solution.squeeze(1)
            indices[g, m, : len(support)] = torch.tensor(support, dtype=torch.int64)
            coefs[g, m, : len(support)] = gamma
    return indices.to(x.device), coefs.float().to(x.device)

"""Pure-PyTorch versions of every fastad op: what each op means, the tests' oracle, and the
benchmarks' naive baseline. Computed in float64 by the definition; memory is not bounded here."""

from __future__ import annotations

import torch
from torch import Tensor


def knn(query: Tensor, bank: Tensor, k: int, *, squared: bool = False) -> tuple[Tensor, Tensor]:
    """k nearest bank rows of each query row: float64 sums of squared differences, sorted
    stably so that equal distances come in index order."""
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
    return (torch.tensor(indices, dtype=torch.int64, device=x.device),
            torch.tensor(radii, dtype=torch.float32, device=x.device))

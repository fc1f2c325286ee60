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

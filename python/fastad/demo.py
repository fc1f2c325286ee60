"""`make demo` until the methods land: what was built, and the kNN op against torch.cdist."""

from __future__ import annotations

import time

import torch

import fastad


def _best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    info = fastad.build_info()
    print("fastad build:")
    for key, value in info.items():
        if key != "parallel_info":  # ATen's multi-line report; fastad.build_info() has it
            print(f"  {key:14s} {value}")

    torch.manual_seed(0)
    m, n, d, k = 2048, 16384, 384, 9
    query, bank = torch.randn(m, d), torch.randn(n, d)
    print(f"\nkNN, M={m} N={n} D={d} k={k}, CPU float32:")
    dist, idx = fastad.ops.knn(query, bank, k)

    def cdist_topk():
        return torch.cdist(query, bank).topk(k, dim=1, largest=False)

    ref = cdist_topk()
    same = (idx == ref.indices).float().mean().item()
    err = (dist - ref.values).abs().max().item()
    t_ours = _best_of(lambda: fastad.ops.knn(query, bank, k))
    t_cdist = _best_of(cdist_topk)
    print(f"  fastad.ops.knn      {t_ours * 1e3:8.1f} ms")
    print(f"  torch.cdist + topk  {t_cdist * 1e3:8.1f} ms   ({t_cdist / t_ours:.2f}x fastad's time)")
    print(f"  same indices: {same:.4%}   max |distance difference|: {err:.2e}")


if __name__ == "__main__":
    main()

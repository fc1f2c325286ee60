"""Every op once on small, awkward shapes: the driver ``compute-sanitizer`` watches.

    compute-sanitizer --tool memcheck python -m benchmarks.gpu_sanitize [--device cuda]

The shapes are the ones where indexing goes wrong: sizes of 1, sizes one past a warp, a block or a
tile, k equal to the number of rows, D above a shared-memory tile, and the layouts the wrappers
pass through (column-major factors, strided queries, half-precision rows). Results are checked
against the CPU kernels loosely, so a kernel that runs cleanly but writes the wrong rows fails
here as well. Runs on the CPU too (``--device cpu``) to check the driver itself.
"""

from __future__ import annotations

import argparse
import sys

import torch

import fastad


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    if a.shape != b.shape or (a.numel() and float((a - b).abs().max()) > rtol * scale):
        raise AssertionError(f"{what}: the device result differs from the CPU kernel's")


def knn_cases(device: str, gen: torch.Generator) -> int:
    cases = [(1, 1, 1, 1), (3, 5, 1, 5), (33, 1025, 129, 9), (1, 70, 384, 1), (65, 300, 33, 17), (784, 7840, 152, 9)]
    for m, n, d, k in cases:
        q, b = torch.randn(m, d, generator=gen), torch.randn(n, d, generator=gen)
        want, _ = fastad.ops.knn(q, b, k)
        got, _ = fastad.ops.knn(q.to(device), b.to(device), k)
        _close(got, want, f"knn M={m} N={n} D={d} k={k}")
        bank = b.to(device)
        got, _ = fastad.ops.knn(q.to(device), bank, k, squared=True, prepared=fastad.ops.knn_prepare(bank))
        _close(got, want.square(), f"knn squared, prepared, M={m} N={n} D={d} k={k}", rtol=1e-3)
    strided = torch.randn(40, 2 * 65, generator=gen)[:, ::2]  # a non-contiguous query
    b = torch.randn(200, 65, generator=gen)
    _close(
        fastad.ops.knn(strided.to(device), b.to(device), 3)[0], fastad.ops.knn(strided, b, 3)[0], "knn strided query"
    )
    return len(cases) * 2 + 1


def kcenter_cases(device: str, gen: torch.Generator) -> int:
    cases = [(1, 1, 1), (1000, 7, 50), (257, 129, 257), (4099, 3, 31), (2049, 128, 100)]
    for n, d, k in cases:
        x = torch.randn(n, d, generator=gen)
        want, _ = fastad.ops.kcenter_greedy(x, k, start=n - 1)
        got, _ = fastad.ops.kcenter_greedy(x.to(device), k, start=n - 1)
        if not torch.equal(got.cpu(), want):
            raise AssertionError(f"kcenter N={n} D={d} k={k}: another selection than the CPU kernel's")
    fastad.ops.kcenter_greedy(torch.randn(513, 40, generator=gen).half().to(device), 20)  # half rows
    return len(cases) + 1


def mahalanobis_cases(device: str, gen: torch.Generator) -> int:
    cases = [(1, 1, 1, 1), (3, 17, 5, 17), (5, 40, 100, 40), (2, 9, 33, 1), (2, 3, 550, 3), (33, 5, 129, 5)]
    for b, p, d, q in cases:
        x, mean = torch.randn(b, p, d, generator=gen), torch.randn(p, d, generator=gen)
        L = torch.randn(q, d, d, generator=gen).tril_() / d**0.5
        L.diagonal(dim1=1, dim2=2).abs_().add_(0.5)
        want = fastad.ops.mahalanobis(x, mean, L)
        for layout, factor in (("row-major", L.contiguous()), ("column-major", L.mT.contiguous().mT)):
            got = fastad.ops.mahalanobis(x.to(device), mean.to(device), factor.to(device))
            _close(got, want, f"mahalanobis B={b} P={p} D={d} Q={q}, L {layout}")
    return len(cases) * 2


def omp_cases(device: str, gen: torch.Generator) -> int:
    cases = [(1, 1, 1, 1, 1), (3, 50, 5, 64, 3), (2, 40, 512, 64, 5), (2, 10, 16, 8, 8), (1, 129, 79, 17, 4)]
    for g, m, k, d, s in cases:
        dictionary = torch.randn(g, k, d, generator=gen)
        dictionary /= dictionary.norm(dim=-1, keepdim=True)
        x = torch.randn(g, m, d, generator=gen)
        want_idx, want_coef = fastad.ops.omp(x, dictionary, s)
        got_idx, got_coef = fastad.ops.omp(x.to(device), dictionary.to(device), s)
        error_want = fastad.ops.omp_error(x, want_idx, want_coef, dictionary)
        error_got = fastad.ops.omp_error(x, got_idx.cpu(), got_coef.cpu(), dictionary)
        _close(error_got, error_want, f"omp G={g} M={m} K={k} d={d} s={s} (residuals)", rtol=1e-3)
    return len(cases)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    done = sum(run(args.device, gen) for run in (knn_cases, kcenter_cases, mahalanobis_cases, omp_cases))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"gpu_sanitize: {done} op calls on {args.device} ran and agree with the CPU kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())

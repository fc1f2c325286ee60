"""Time and communication of the distributed greedy k-center (``fastad.distributed``) against the
one-process op, on localhost with gloo.

    python -m benchmarks.distributed_kcenter [--rows 200000] [--dim 128] [--k 2000] [--ranks 1 2 4]

Every rank builds the same seeded rows and keeps its block (``fastad.distributed.shard``); rank 0
reports the selection's wall time (best of ``--rounds``), the collectives and the bytes each rank
received, and whether indices and radii equal ``fastad.ops.kcenter_greedy`` on all the rows. On a
two-core machine this measures correctness and overhead, not speed-up: the ranks share the cores
(each is given one thread).
"""

from __future__ import annotations

import argparse
import time

from .ranks import launch


def _rows(n: int, d: int):
    import torch

    return torch.randn(n, d, generator=torch.Generator().manual_seed(0))


def _rank(rank: int, size: int, n: int, d: int, k: int, rounds: int):
    import torch
    import torch.distributed as dist

    import fastad
    from fastad import distributed

    torch.set_num_threads(1)
    x = _rows(n, d)
    block = distributed.shard(n)
    mine = x[block.start : block.stop].clone()
    best, log, result = float("inf"), None, None
    for _ in range(rounds):
        dist.barrier()
        log = distributed.CommunicationLog()
        started = time.perf_counter()
        result = distributed.kcenter_greedy(mine, k, start=0, log=log)
        best = min(best, time.perf_counter() - started)
    if rank != 0:
        return None
    expected = fastad.ops.kcenter_greedy(x, k, start=0)
    same = bool(torch.equal(result[0], expected[0]) and torch.equal(result[1], expected[1]))
    return best, log.collectives, log.bytes_received, same


def _one_process(n: int, d: int, k: int, rounds: int) -> float:
    import torch

    import fastad

    torch.set_num_threads(1)
    x = _rows(n, d)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fastad.ops.kcenter_greedy(x, k, start=0)
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=2000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    n, d, k = args.rows, args.dim, args.k
    print(f"greedy k-center, N = {n:,}, D = {d}, k = {k:,}, float32, gloo on localhost, 1 thread per rank")
    print(f"  one process, fastad.ops.kcenter_greedy: {_one_process(n, d, k, args.rounds) * 1e3:.1f} ms")
    for size in args.ranks:
        best, collectives, received, same = launch(size, _rank, n, d, k, args.rounds)[0]
        per_step = received / max(1, collectives)
        print(
            f"  {size} rank(s): {best * 1e3:.1f} ms ({best / k * 1e6:.0f} us a step), {collectives:,} collectives, "
            f"{received / 1e6:.2f} MB received per rank ({per_step:.0f} B per collective), "
            f"same selection as one process: {same}"
        )


if __name__ == "__main__":
    main()

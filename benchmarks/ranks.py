"""Running a benchmark body on several local processes (gloo on localhost), for the distributed
benchmarks: each rank is spawned fresh, joins the group and puts what it measured in a queue."""

from __future__ import annotations

import datetime
import multiprocessing
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(body, rank: int, size: int, port: int, args: tuple, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=600),
    )
    try:
        queue.put((rank, body(rank, size, *args)))
    finally:
        dist.destroy_process_group()


def launch(size: int, body, *args, timeout_s: float = 1800) -> list:
    """``body(rank, size, *args)`` on ``size`` spawned processes in one gloo group (``body`` must be
    a module-level function); returns each rank's result, in rank order."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(body, r, size, port, args, queue)) for r in range(size)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=timeout_s) for _ in range(size))
    for p in procs:
        p.join(60)
    return [results[r] for r in range(size)]


class CollectiveCounter:
    """Counts torch.distributed's tensor collectives in this process and the bytes each brought
    in (all_gather: every rank's tensor; all_reduce and broadcast: the tensor), by wrapping them
    for the benchmark's duration; all_gather_object is counted through the all_gathers it makes."""

    NAMES = ("all_gather", "all_reduce", "broadcast")

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self._saved: list = []

    def __enter__(self) -> CollectiveCounter:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        for name in self.NAMES:
            original = getattr(c10d, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                self.calls += 1
                first = args[0] if args else kwargs.get("tensor_list", kwargs.get("tensor"))
                tensors = first if isinstance(first, (list, tuple)) else [first]
                self.bytes += sum(t.numel() * t.element_size() for t in tensors)
                return _original(*args, **kwargs)

            for module in (dist, c10d):
                self._saved.append((module, name, getattr(module, name)))
                setattr(module, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()

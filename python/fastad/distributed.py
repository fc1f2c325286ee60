"""fastad across processes with ``torch.distributed``: the same answers as one process.

Launch with ``torchrun`` (gloo on CPUs, NCCL on GPUs) or initialise a process group yourself;
without one, every function here behaves as a single process (rank 0 of 1).

- :func:`world`: this process's rank and the number of processes.
- :func:`shard`: the consecutive block of ``n`` items (images, rows) that a rank owns.
- :func:`kcenter_greedy`: the exact greedy k-center selection over rows split among the ranks,
  the selection ``fastad.ops.kcenter_greedy`` makes on all the rows in one process. Each rank
  keeps the CPU kernel's lazy bounds for its own rows (``torch.classes.fastad.KCenterShard``);
  per step one all-gather carries each rank's farthest row (squared distance, global row, values)
  and every rank picks the same winner: the largest distance, ties to the lowest global row.
- :func:`knn_across_shards` and :func:`rows_across_shards`: a bank split across the ranks
  (each rank holds some of its rows, with their global indices) searched and read as one: every
  rank gets the k nearest rows of the whole bank, ties to the lowest global index, as
  ``fastad.ops.knn`` gives on the whole bank in one process.
- Gaussian statistics: :meth:`fastad.gaussian_stats.GaussianAccumulator.all_reduce_`.
- Fitting: under a process group, ``AnomalyModel.fit`` gives each rank its block of the training
  images (:func:`shard_data`); each method then merges what the ranks learned into the model
  one process would have fitted (MLF-SC's streamed OMP learner refuses, by name).
  :func:`init_from_environment` joins the group ``torchrun`` describes (the CLI calls it).

Collectives run on the CPU tensors here, so the process group needs a CPU backend (gloo, or a
``"cpu:gloo,cuda:nccl"`` group). A rank that dies makes the others' next collective fail with
the backend's error instead of waiting for ever (gloo notices the closed connection; the group's
``timeout`` bounds the rest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import ops
from ._batching import is_map_dataset
from .checks import check_int

__all__ = [
    "CommunicationLog",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "init_from_environment",
    "process_device",
    "all_gather_rows",
    "is_distributed",
    "kcenter_greedy",
    "knn_across_shards",
    "leave_environment_group",
    "rows_across_shards",
    "shard",
    "shard_data",
    "world",
]


def _dist():
    import torch.distributed as dist

    return dist


def world(group=None) -> tuple[int, int]:
    """(rank, size) in ``group`` (the default group when None); (0, 1) without torch.distributed."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_distributed(group=None) -> bool:
    """True inside a process group of more than one process."""
    return world(group)[1] > 1


def init_from_environment(device: str = "cpu", *, timeout_s: float = 600.0) -> bool:
    """Joins the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1,
    ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), with gloo for CPU work (and NCCL beside it when
    ``device`` is CUDA); returns whether this process is now one of several. Does nothing when a
    group exists already or the environment names a single process. ``timeout_s`` bounds every
    collective, so that a rank that dies stops the others instead of leaving them waiting."""
    import datetime
    import os

    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 asks for torch.distributed, which this torch was built without")
    backend = "cpu:gloo,cuda:nccl" if str(device).startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    global _joined_from_environment
    _joined_from_environment = True
    return is_distributed()


# Whether init_from_environment made the default group (so that only it is torn down here).
_joined_from_environment = False


def leave_environment_group() -> None:
    """Destroys the process group :func:`init_from_environment` made; a group made by the caller
    is left alone. Every process must have finished its collectives (the CLI's commands end with
    a barrier). Call it when the job has ended
    well: a process that exits with its gloo group alive can abort in the backend's threads
    ("terminate called without an active exception") after its work is done, failing the
    torchrun job. After an error it is not called, since the other processes may still be
    inside a collective that would never finish."""
    global _joined_from_environment
    dist = _dist()
    if not _joined_from_environment or not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    _joined_from_environment = False


def process_device(device: str | None) -> str | None:
    """The device this process of a torchrun job should use for ``device``: a bare ``"cuda"``
    becomes ``"cuda:<LOCAL_RANK>"`` (one GPU per process on each machine, torchrun's convention);
    anything else, or outside a torchrun job, is returned as it is."""
    import os

    if device is None or str(device) != "cuda" or "LOCAL_RANK" not in os.environ or not is_distributed():
        return device
    return f"cuda:{int(os.environ['LOCAL_RANK'])}"


def barrier(group=None) -> None:
    """Waits for every process of ``group``; nothing without one."""
    if is_distributed(group):
        _dist().barrier(group=group)


def all_reduce_sum(value: int | float, group=None) -> int | float:
    """The sum of ``value`` over the processes (``value`` itself without a group)."""
    if not is_distributed(group):
        return value
    kind = torch.int64 if isinstance(value, int) else torch.float64
    t = torch.tensor([value], dtype=kind)
    _dist().all_reduce(t, group=group)
    return type(value)(t.item())


def all_gather_objects(value, group=None) -> list:
    """Every process's ``value`` (picklable), in rank order; ``[value]`` without a group."""
    if not is_distributed(group):
        return [value]
    out = [None] * world(group)[1]
    _dist().all_gather_object(out, value, group=group)
    return out


def all_gather_rows(rows: Tensor | None, group=None) -> Tensor | None:
    """Every process's ``rows`` (N_r, ...) concatenated in process order, on every process (on
    ``rows``' device; CPU where this process has none): the tensor one process would hold had it
    made every block. A process may give None (it made no rows); all None gives None. The
    processes' rows must agree in everything but N_r (else a ValueError on every process)."""
    meta = all_gather_objects(
        None if rows is None else (tuple(rows.shape), str(rows.dtype).removeprefix("torch.")), group
    )
    present = [m for m in meta if m is not None]
    if not present:
        return None
    if len({(shape[1:], dtype) for shape, dtype in present}) > 1:
        raise ValueError(
            "the processes' rows differ in shape or dtype beyond their count: "
            + ", ".join(f"process {r}: {m[1]} {m[0]}" for r, m in enumerate(meta) if m is not None)
        )
    tail, dtype = present[0][0][1:], getattr(torch, present[0][1])
    if not is_distributed(group):
        return rows
    longest = max(shape[0] for shape, _ in present)
    padded = torch.zeros((longest, *tail), dtype=dtype)  # all_gather wants one shape from every process
    if rows is not None:
        padded[: rows.shape[0]] = rows.detach().cpu()
    gathered = _all_gather(padded, world(group)[1], group, None, "rows")
    out = torch.cat([gathered[r, : m[0][0]] for r, m in enumerate(meta) if m is not None])
    return out.to(rows.device) if rows is not None else out


def shard_data(data, group=None) -> tuple[object, int, int]:
    """(this rank's block of ``data``, the global index of its first item, the number of items in
    all). ``data`` is a tensor of images (N, ...) or a map-style data set; an iterable without a
    length (a DataLoader) cannot be split by index here and is refused: give the data set itself.
    Every rank must own at least one item."""
    if isinstance(data, torch.Tensor):
        total = data.shape[0] if data.dim() == 4 else 1
    elif is_map_dataset(data):
        total = len(data)
    else:
        raise ValueError(
            f"fitting across {world(group)[1]} processes splits the training images by index: give a "
            f"data set or an image tensor, not a {type(data).__name__} (a DataLoader cannot be split here)"
        )
    rank, size = world(group)
    if total < size:
        raise ValueError(f"fitting across {size} processes needs at least one training image per process, got {total}")
    block = shard(total, rank, size)
    if isinstance(data, torch.Tensor):
        part = data[block.start : block.stop] if data.dim() == 4 else data
    else:
        part = torch.utils.data.Subset(data, list(block))
    return part, block.start, total


def shard(n: int, rank: int | None = None, size: int | None = None, *, group=None) -> range:
    """The items of ``range(n)`` that ``rank`` of ``size`` owns: a consecutive block, the blocks
    in rank order and at most one item apart in length (defaults: this process in ``group``).
    Consecutive blocks are what makes the global tie rules (lowest index) come out of per-rank
    ones."""
    n = check_int(n, "n", minimum=0)
    here_rank, here_size = world(group)
    rank = here_rank if rank is None else check_int(rank, "rank", minimum=0)
    size = here_size if size is None else check_int(size, "size", minimum=1)
    if rank >= size:
        raise ValueError(f"rank must be below size ({size}), got {rank}")
    return range(n * rank // size, n * (rank + 1) // size)


@dataclass
class CommunicationLog:
    """What a distributed call sent through collectives: their count and the bytes each rank
    received."""

    collectives: int = 0
    bytes_received: int = 0
    steps: list[str] = field(default_factory=list)

    def add(self, what: str, received: int) -> None:
        self.collectives += 1
        self.bytes_received += int(received)
        if what not in self.steps:
            self.steps.append(what)


def _all_gather(tensor: Tensor, size: int, group, log: CommunicationLog | None, what: str) -> Tensor:
    """(size, *tensor.shape): every rank's tensor, in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(size)]
    _dist().all_gather(parts, tensor, group=group)
    out = torch.stack(parts)
    if log is not None:
        log.add(what, out.numel() * out.element_size())
    return out


@torch.no_grad()
def kcenter_greedy(
    x: Tensor, k: int, *, start: int = 0, group=None, log: CommunicationLog | None = None
) -> tuple[Tensor, Tensor]:
    """Greedy k-center selection over the rows of every rank's ``x`` taken together.

    ``x`` (n_r, D) holds this rank's rows, which are rows ``offset_r .. offset_r + n_r`` of the
    whole (the ranks' blocks in rank order, as :func:`shard` gives them; a rank may hold none).
    ``k`` and ``start`` (a global row) are the same on every rank. Returns, on every rank,
    ``(indices (k,) int64 global rows in selection order, radii (k,) float32)``: what
    ``fastad.ops.kcenter_greedy`` returns for all the rows concatenated in one process, when the
    ranks' CPUs use the same distance kernels (``FASTAD_KCENTER_CPU_ISA`` can make them). Runs on
    the CPU (the rows are copied there if needed). Per step: one all-gather of each rank's
    candidate, (D + 2) float64 values. ``log`` (optional) counts the collectives and bytes.
    Without a process group it is the op itself.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor of shape (n, D), got {x.dim()}-D with shape {tuple(x.shape)}")
    k = check_int(k, "k", minimum=1)
    start = check_int(start, "start", minimum=0)
    rank, size = world(group)
    x = x.detach().cpu()
    if size == 1:
        return ops.kcenter_greedy(x, k, start=start)
    d = x.shape[1]
    dims = _all_gather(torch.tensor([x.shape[0], d], dtype=torch.int64), size, group, log, "row counts")
    if bool((dims[:, 1] != d).any()):
        raise ValueError(f"every rank's x must have the same number of columns, got {dims[:, 1].tolist()}")
    counts = dims[:, 0]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    total = int(offsets[-1])
    if total == 0:
        raise ValueError("the ranks hold no rows at all (every x is empty)")
    if k > total:
        raise ValueError(f"k must be between 1 and the number of rows of all ranks ({total}), got k = {k}")
    if start >= total:
        raise ValueError(f"start must be a row of all ranks' x, between 0 and {total - 1}, got start = {start}")
    offset = int(offsets[rank])
    owner = int(torch.searchsorted(offsets[1:], torch.tensor(start), right=True))
    engine = torch.classes.fastad.KCenterShard(x, k)

    local_start = start - offset if rank == owner else -1
    message = torch.zeros(d + 2, dtype=torch.float64)
    if rank == owner:
        message[2:] = x[local_start].float().double()
    # The first row travels in the same message form as every later one: one all-gather.
    first = _all_gather(message, size, group, log, "candidates")[owner, 2:].float().contiguous()
    engine.begin(first, local_start)

    indices = torch.empty(k, dtype=torch.int64)
    radii = torch.empty(k, dtype=torch.float32)
    indices[0], radii[0] = start, float("inf")
    for t in range(1, k):
        bound, local = engine.propose()
        message[0] = bound
        message[1] = offset + local if local >= 0 else total  # total: "no candidate here"
        if local >= 0:
            message[2:] = x[local].float().double()
        gathered = _all_gather(message, size, group, log, "candidates")
        # The largest bound, ties to the lowest global row: the one-process rule.
        best = max(range(size), key=lambda r: (float(gathered[r, 0]), -float(gathered[r, 1])))
        winner_row = int(gathered[best, 1])
        point = gathered[best, 2:].float().contiguous()
        engine.add(point, local if best == rank else -1)
        indices[t] = winner_row
        # sqrt in float64 rounded to float32 is float32's correctly rounded sqrt, the op's std::sqrt.
        radii[t] = math.sqrt(float(gathered[best, 0]))
    return indices, radii


def _check_shard(shard: Tensor, rows: Tensor) -> None:
    if not isinstance(shard, Tensor) or shard.dim() != 2:
        raise ValueError(
            f"shard must be a 2-D tensor (n, D) of this rank's bank rows, got "
            f"{tuple(shard.shape) if isinstance(shard, Tensor) else type(shard).__name__}"
        )
    if not isinstance(rows, Tensor) or rows.dtype != torch.int64 or rows.shape != (shard.shape[0],):
        raise ValueError(
            f"rows must be an int64 tensor ({shard.shape[0]},) of the shard's global row indices, got "
            f"{(rows.dtype, tuple(rows.shape)) if isinstance(rows, Tensor) else type(rows).__name__}"
        )


@torch.no_grad()
def knn_across_shards(
    query: Tensor,
    shard: Tensor,
    rows: Tensor,
    k: int,
    *,
    squared: bool = False,
    prepared: Tensor | None = None,
    group=None,
    log: CommunicationLog | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest rows of a bank split across the ranks, for a query every rank holds.

    ``query`` (M, D): the same on every rank. ``shard`` (n_r, D): this rank's rows of the bank
    (n_r may be 0), ``rows`` (n_r,) int64 their indices in the whole bank, ascending. Returns
    ``(distances (M, k) float32 ascending, indices (M, k) int64 rows of the whole bank)`` on
    ``query``'s device, equal distances ordered by the lower index: what ``fastad.ops.knn``
    returns on the whole bank in one process (each distance is computed by the same kernel from
    the same two rows). ``prepared``: ``fastad.ops.knn_prepare(shard)``. Per call: one all-gather
    of M k (4 + 8) bytes per rank. Without a process group it is ``ops.knn`` with the indices
    mapped through ``rows``.
    """
    _check_shard(shard, rows)
    k = check_int(k, "k")
    rank, size = world(group)
    n_local = shard.shape[0]
    total = all_reduce_sum(int(n_local), group)
    if k > total:
        raise ValueError(f"k must be at most the number of rows of the whole bank ({total}), got k = {k}")
    m = query.shape[0]
    distances = torch.full((m, k), math.inf, dtype=torch.float32)
    indices = torch.full((m, k), torch.iinfo(torch.int64).max, dtype=torch.int64)  # "none": sorts last
    if n_local:
        here = min(k, n_local)
        d, i = ops.knn(query, shard, here, squared=squared, prepared=prepared)
        distances[:, :here] = d.cpu()
        indices[:, :here] = rows.cpu()[i.cpu()]
    if size > 1:
        distances = _all_gather(distances, size, group, log, "distances").permute(1, 0, 2).reshape(m, size * k)
        indices = _all_gather(indices, size, group, log, "indices").permute(1, 0, 2).reshape(m, size * k)
        # By index, then stably by distance: the one-process order (distance, ties to the lower index).
        by_index = indices.argsort(dim=1)
        distances, indices = distances.gather(1, by_index), indices.gather(1, by_index)
        by_distance = distances.argsort(dim=1, stable=True)[:, :k]
        distances, indices = distances.gather(1, by_distance), indices.gather(1, by_distance)
    return distances.to(query.device), indices.to(query.device)


@torch.no_grad()
def rows_across_shards(
    indices: Tensor, shard: Tensor, rows: Tensor, *, group=None, log: CommunicationLog | None = None
) -> Tensor:
    """Rows ``indices`` (any shape, int64 indices of the whole bank) of a bank split across the
    ranks, on every rank: (*indices.shape, D) float32 on ``shard``'s device. Each row comes from
    the rank that holds it (one all-reduce of the result's size: the others add zeros, and
    x + 0 = x, so the rows arrive exact; float32 holds every bank dtype exactly)."""
    _check_shard(shard, rows)
    flat = indices.reshape(-1).cpu()
    local_rows = rows.cpu()
    where = torch.searchsorted(local_rows, flat).clamp(max=max(0, local_rows.shape[0] - 1))
    mine = (local_rows[where] == flat) if local_rows.numel() else torch.zeros_like(flat, dtype=torch.bool)
    out = torch.zeros(flat.shape[0], shard.shape[1], dtype=torch.float32)
    if bool(mine.any()):
        out[mine] = shard[where[mine].to(shard.device)].float().cpu()
    rank, size = world(group)
    if size > 1:
        _dist().all_reduce(out, group=group)
        if log is not None:
            log.add("rows", out.numel() * out.element_size())
    found = all_reduce_sum(int(mine.sum()), group)
    if found != flat.shape[0]:
        raise ValueError(f"{flat.shape[0] - found} of the {flat.shape[0]} requested rows are held by no rank")
    return out.reshape(*indices.shape, shard.shape[1]).to(shard.device)

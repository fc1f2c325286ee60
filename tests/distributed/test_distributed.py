"""fastad.distributed on localhost (gloo, 2 and 3 processes): the same answers as one process.

Each test spawns its ranks once and runs several cases in them (a spawn costs seconds of imports);
every wait is bounded, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import multiprocessing
import socket
import time
import uuid

import pytest
import torch

import fastad
from fastad import distributed
from fastad.gaussian_stats import GaussianAccumulator

from . import workers

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch was built without torch.distributed / gloo",
)

DEADLINE = 240  # seconds for all ranks of one test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(size: int, body: str, *args, tmp_path) -> list[dict]:
    """Runs ``workers.BODIES[body]`` on ``size`` ranks; returns each rank's saved result."""
    ctx = multiprocessing.get_context("spawn")
    rendezvous = str(tmp_path / f"group-{uuid.uuid4().hex}")
    procs = [
        ctx.Process(target=workers.run, args=(r, size, rendezvous, str(tmp_path), body, args)) for r in range(size)
    ]
    for p in procs:
        p.start()
    end = time.monotonic() + DEADLINE
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join(5)
    assert not alive, f"{len(alive)} rank(s) still running after {DEADLINE} s: a collective hung"
    results = []
    for r in range(size):
        path = tmp_path / f"{r}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else {"exited": procs[r].exitcode})
    return results


def _ok(results: list[dict]) -> list:
    for r, res in enumerate(results):
        assert "ok" in res, f"rank {r}: {res.get('error') or res}\n{res.get('trace', '')}"
    return [res["ok"] for res in results]


KCENTER_CASES = {
    2: [
        (0, 400, 16, 60, 7, "normal", [250, 150]),
        (1, 300, 5, 120, 0, "integers", [150, 150]),  # exact ties and duplicates across the shards
        (2, 64, 3, 64, 63, "integers", [1, 63]),
    ],  # every row chosen; start on the last rank
    3: [
        (3, 500, 24, 80, 250, "normal", [100, 0, 400]),  # an empty rank in the middle
        (4, 200, 4, 200, 5, "integers", [70, 70, 60]),
    ],
}


@pytest.mark.parametrize("size", [2, 3])
def test_kcenter_selects_what_one_process_selects(size, tmp_path):
    per_rank = _ok(spawn(size, "kcenter", KCENTER_CASES[size], tmp_path=tmp_path))
    for c, (seed, n, d, k, start, kind, _) in enumerate(KCENTER_CASES[size]):
        x = workers.kcenter_data(seed, n, d, kind)
        expected_idx, expected_radii = fastad.ops.kcenter_greedy(x, k, start=start)
        for r in range(size):
            indices, radii, collectives, received = per_rank[r][c]
            assert torch.equal(indices, expected_idx), f"case {c}, rank {r}"
            assert torch.equal(radii, expected_radii), f"case {c}, rank {r}"
            # One gather of the row counts, then one of the candidates per chosen row.
            assert collectives == k + 1
            assert received == size * 2 * 8 + k * size * (d + 2) * 8


KNN_CASES = [
    (5, 300, 40, 16, 5, "normal", [120, 0, 180]),  # an empty shard
    (6, 200, 30, 3, 9, "integers", [2, 100, 98]),  # exact ties across shards; k above a shard's rows
    (7, 12, 5, 8, 12, "normal", [4, 4, 4]),
]  # the whole bank


def test_knn_across_shards_is_knn_on_the_whole_bank(tmp_path):
    per_rank = _ok(spawn(3, "knn_shards", KNN_CASES, tmp_path=tmp_path))
    for c, (seed, n, m, d, k, kind, _) in enumerate(KNN_CASES):
        bank, query = workers.kcenter_data(seed, n, d, kind), workers.kcenter_data(seed + 1, m, d, kind)
        expected_d, expected_i = fastad.ops.knn(query, bank, k)
        if kind == "integers":
            assert bool((expected_d[:, 1:] == expected_d[:, :-1]).any())  # the case has ties to break
        for r in range(3):
            distances, indices, read, received = per_rank[r][c]
            assert torch.equal(indices, expected_i), f"case {c}, rank {r}"
            assert torch.equal(distances, expected_d), f"case {c}, rank {r}"
            assert torch.equal(read, bank[expected_i])
            assert received == 3 * m * k * (4 + 8)  # one gather of distances and one of indices


def test_knn_across_shards_without_a_group_maps_the_rows():
    gen = torch.Generator().manual_seed(3)
    bank, query = torch.randn(50, 8, generator=gen), torch.randn(7, 8, generator=gen)
    rows = torch.arange(50) * 2 + 5
    got_d, got_i = distributed.knn_across_shards(query, bank, rows, 4)
    expected_d, expected_i = fastad.ops.knn(query, bank, 4)
    assert torch.equal(got_d, expected_d) and torch.equal(got_i, rows[expected_i])
    assert torch.equal(distributed.rows_across_shards(rows[[3, 0]], bank, rows), bank[[3, 0]])
    with pytest.raises(ValueError, match="k must be at most the number of rows of the whole bank"):
        distributed.knn_across_shards(query, bank, rows, 51)
    with pytest.raises(ValueError, match="held by no rank"):
        distributed.rows_across_shards(torch.tensor([4]), bank, rows)
    with pytest.raises(ValueError, match="rows must be an int64 tensor"):
        distributed.knn_across_shards(query, bank, rows.int(), 1)


def test_cuda_means_the_gpu_of_the_local_rank(tmp_path):
    assert distributed.process_device("cuda") == "cuda"  # no group: as given
    results = _ok(spawn(2, "devices", tmp_path=tmp_path))
    assert results == [["cuda:0", "cuda:1", "cpu", None], ["cuda:1", "cuda:1", "cpu", None]]


def test_the_group_joined_from_the_environment_is_torn_down_and_no_other(tmp_path):
    # A CLI process under torchrun that exits with its gloo group alive can abort after its work
    # is done; the CLI tears down the group it joined, and only that one.
    results = _ok(spawn(2, "environment_group", _free_port(), tmp_path=tmp_path))
    assert results == [[True, True, 3, False]] * 2


def test_gaussian_statistics_merge_to_one_process(tmp_path):
    counts = [3, 5, 1, 4, 2]  # batches, dealt round-robin to the ranks
    positions, dim = 7, 5
    results = _ok(spawn(2, "gaussian", 11, positions, dim, counts, tmp_path=tmp_path))
    gen = torch.Generator().manual_seed(11)
    one = GaussianAccumulator(positions, dim, fourth_moments=True, position_chunk=3)
    for c in counts:
        one.update((torch.randn(c, positions, dim, generator=gen, dtype=torch.float64) * 3 + 5).float())
    for res in results:
        assert res["count"] == one.count == sum(counts)
        torch.testing.assert_close(res["mean"], one.mean(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["cov"], one.covariance(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res["lw"], one.ledoit_wolf()[0], rtol=1e-10, atol=1e-12)


def test_a_dead_rank_makes_the_others_fail_not_hang(tmp_path):
    started = time.monotonic()
    results = spawn(2, "dies", 10, tmp_path=tmp_path)
    assert results[1] == {"exited": 3}
    assert "error" in results[0], f"rank 0 finished without its peer: {results[0]}"
    assert time.monotonic() - started < DEADLINE


def test_without_a_process_group_it_is_one_process():
    assert distributed.world() == (0, 1)
    x = torch.randn(100, 6, generator=torch.Generator().manual_seed(0))
    got = distributed.kcenter_greedy(x, 12, start=4)
    expected = fastad.ops.kcenter_greedy(x, 12, start=4)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("n,size", [(0, 3), (1, 3), (10, 3), (11, 4), (1000, 7)])
def test_shards_are_consecutive_balanced_blocks(n, size):
    blocks = [distributed.shard(n, r, size) for r in range(size)]
    assert [i for b in blocks for i in b] == list(range(n))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rank must be below size"):
        distributed.shard(10, 3, 3)
    with pytest.raises(ValueError, match="x must be a 2-D tensor"):
        distributed.kcenter_greedy(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="k must be a positive int"):
        distributed.kcenter_greedy(torch.zeros(5, 2), 0)


def test_shard_engine_refuses_misuse():
    x = torch.randn(20, 3)
    engine = torch.classes.fastad.KCenterShard(x, 3)
    with pytest.raises(Exception, match="begin\\(\\) must choose the first row"):
        engine.propose()
    with pytest.raises(Exception, match="must hold the values of row 2"):
        engine.begin(x[3].contiguous(), 2)
    engine.begin(x[2].contiguous(), 2)
    bound, local = engine.propose()
    other = (local + 1) % 20
    with pytest.raises(Exception, match="is not this shard's proposal"):
        engine.add(x[other].contiguous(), other)
    engine.add(x[local].contiguous(), local)
    engine.add(torch.zeros(3), -1)
    with pytest.raises(Exception, match="capacity of 3"):
        engine.add(torch.zeros(3), -1)

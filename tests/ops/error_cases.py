"""Every bad input of the four ops, with the whole message it must raise.

Run by tests/ops/test_errors.py in a worker process (tests/isolation.py): a case that crashes is
one failed test. Messages are compared whole, numbers included: a second C++ runtime in the
process once cut every message at its first number ("k must be between 1 and the number of bank
rows ("), and a prefix match would have passed that.

A case is ``Case(call, exc, message)``: ``call(device)`` makes the inputs on ``device`` and calls
the op; ``message`` may name ``{dev}`` (the device as torch prints it, e.g. ``cuda:0``).
``cpu_only`` cases test what only the CPU kernel checks (non-finite values, its ISA switches) or
need inputs on two devices.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastad


@dataclass(frozen=True)
class Case:
    call: Callable[[str], object]
    exc: str  # the exception's qualified name
    message: str
    cpu_only: bool = False
    cuda_only: bool = False


VALUE, TYPE = "builtins.ValueError", "builtins.TypeError"


def _ones(shape, dev, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype, device=dev)


def _randn(shape, dev, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=dev, dtype=dtype)


# ---- knn ----------------------------------------------------------------------------------------


def _knn(q_shape, b_shape, k, q_dtype=torch.float32, b_dtype=torch.float32):
    return lambda dev: fastad.ops.knn(_randn(q_shape, dev, q_dtype), _randn(b_shape, dev, b_dtype, 1), k)


def _prepared_bank(seed=1):
    return _randn((2000, 64), "cpu", seed=seed)


def _knn_tampered(tamper):
    def call(dev):
        bank = _prepared_bank()
        return fastad.ops.knn(
            _randn((10, 64), dev), bank.to(dev), 1, prepared=tamper(fastad.ops.knn_prepare(bank)).to(dev)
        )

    return call


def _knn_other_bank(make_bank):
    def call(dev):
        bank = _prepared_bank()
        return fastad.ops.knn(_randn((10, 64), "cpu"), make_bank(bank), 1, prepared=fastad.ops.knn_prepare(bank))

    return call


def _changed(bank):
    bank = bank.clone()
    bank[0] += 1.0  # row 0 is always among the fingerprinted rows
    return bank


def _with_env(name, value, call):
    def run(dev):
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            return call(dev)
        finally:  # the worker runs the next cases: leave its environment as it was
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before

    return run


KNN = {
    "query-1d": Case(
        _knn((4,), (5, 4), 1), VALUE, "query must be a 2-D tensor of shape (M, D), got 1-D with shape [4]"
    ),
    "bank-3d": Case(
        _knn((4, 3), (5, 4, 1), 1), VALUE, "bank must be a 2-D tensor of shape (N, D), got 3-D with shape [5, 4, 1]"
    ),
    "d-mismatch": Case(
        _knn((4, 3), (5, 4), 1),
        VALUE,
        "query and bank must have the same feature size D, got query D = 3 and bank D = 4",
    ),
    "k-0": Case(_knn((4, 3), (5, 3), 0), VALUE, "k must be between 1 and the number of bank rows (5), got k = 0"),
    "k-above-n": Case(_knn((4, 3), (5, 3), 6), VALUE, "k must be between 1 and the number of bank rows (5), got k = 6"),
    "k-huge": Case(
        _knn((4, 3), (5, 3), 2**62), VALUE, f"k must be between 1 and the number of bank rows (5), got k = {2**62}"
    ),
    "bank-empty": Case(_knn((4, 3), (0, 3), 1), VALUE, "bank must hold at least one row, got N = 0"),
    "double": Case(
        _knn((4, 3), (5, 3), 1, torch.float64, torch.float64),
        TYPE,
        "bank must be float32, float16 or bfloat16, got Double (cast it with .float())",
    ),
    "int64": Case(
        _knn((4, 3), (5, 3), 1, torch.int64, torch.int64), TYPE, "bank must be float32, float16 or bfloat16, got Long"
    ),
    "mixed-dtype": Case(
        _knn((4, 3), (5, 3), 1, torch.float32, torch.float16),
        TYPE,
        "query and bank must have the same dtype, got Float and Half",
    ),
    "k-float": Case(
        lambda dev: fastad.ops.knn(_ones((4, 3), dev), _ones((5, 3), dev), 1.5), TYPE, "k must be an int, got float 1.5"
    ),
    "k-bool": Case(
        lambda dev: fastad.ops.knn(_ones((4, 3), dev), _ones((5, 3), dev), True),
        TYPE,
        "k must be an int, got bool True",
    ),
    "k-beyond-int64": Case(
        lambda dev: fastad.ops.knn(_ones((4, 3), dev), _ones((5, 3), dev), 2**70),
        VALUE,
        f"k must fit in a 64-bit integer, got {2**70}",
    ),
    "query-list": Case(
        lambda dev: fastad.ops.knn([[1.0, 2.0, 3.0]], _ones((5, 3), dev), 1),
        TYPE,
        "query must be a torch.Tensor, got list",
    ),
    "bank-none": Case(
        lambda dev: fastad.ops.knn(_ones((4, 3), dev), None, 1), TYPE, "bank must be a torch.Tensor, got NoneType"
    ),
    "prepared-meta": Case(
        lambda dev: fastad.ops.knn(
            _ones((4, 64), dev), _prepared_bank().to(dev), 1, prepared=torch.empty(0, dtype=torch.uint8, device="meta")
        ),
        VALUE,
        "prepared must be on the bank's device ({dev}), got meta; make it with fastad.ops.knn_prepare(bank)",
    ),
    "prepared-on-cuda-bank-on-cpu": Case(
        lambda dev: fastad.ops.knn(
            _ones((4, 64), "cpu"), _prepared_bank(), 1, prepared=fastad.ops.knn_prepare(_prepared_bank().to(dev))
        ),
        VALUE,
        "prepared must be on the bank's device (cpu), got {dev}; make it with fastad.ops.knn_prepare(bank)",
        cuda_only=True,
    ),
    "prepare-array": Case(
        lambda dev: fastad.ops.knn_prepare(_ones((5, 40), "cpu").numpy()),
        TYPE,
        "bank must be a torch.Tensor, got ndarray",
    ),
    "k-str": Case(
        lambda dev: fastad.ops.knn(_ones((4, 3), dev), _ones((5, 3), dev), "3"), TYPE, "k must be an int, got str '3'"
    ),
    "two-devices": Case(
        lambda dev: fastad.ops.knn(_ones((4, 3), "cpu"), _ones((5, 3), dev), 1),
        VALUE,
        "query and bank must be on the same device, got cpu and {dev}",
        cuda_only=True,
    ),
    "unknown-cpu-isa": Case(
        _with_env("FASTAD_KNN_CPU_ISA", "avx512", _knn((4, 3), (5, 3), 1)),
        VALUE,
        "FASTAD_KNN_CPU_ISA must be amx, vnni, avx2 or portable, got 'avx512'",
        cpu_only=True,
    ),
    "prepared-float": Case(
        _knn_tampered(lambda p: p.float()),
        VALUE,
        "prepared must be the 1-D uint8 CPU tensor that fastad.ops.knn_prepare(bank) returns, "
        "got Float of shape [169920] on cpu",
        cpu_only=True,
    ),
    "prepared-2d": Case(
        _knn_tampered(lambda p: p.view(-1, 64)),
        VALUE,
        "prepared must be the 1-D uint8 CPU tensor that fastad.ops.knn_prepare(bank) returns, "
        "got Byte of shape [2655, 64] on cpu",
        cpu_only=True,
    ),
    "prepared-cpu-on-cuda": Case(
        _knn_tampered(lambda p: p),
        VALUE,
        "prepared must be fastad.ops.knn_prepare(bank) of this CUDA bank, which is empty; "
        "got 169920 bytes (a CPU bank's?)",
        cuda_only=True,
    ),
    "prepared-short": Case(
        _knn_tampered(lambda p: p[:40]),
        VALUE,
        "prepared is too short to be a prepared bank; make it again with fastad.ops.knn_prepare(bank)",
        cpu_only=True,
    ),
    "prepared-cut": Case(
        _knn_tampered(lambda p: p[:-64]),
        VALUE,
        "prepared has a corrupt layout; make it again with fastad.ops.knn_prepare(bank)",
        cpu_only=True,
    ),
    "prepared-header": Case(
        _knn_tampered(lambda p: torch.cat([torch.zeros(8, dtype=torch.uint8), p[8:]])),
        VALUE,
        "prepared is not a prepared bank of this fastad build; make it again with fastad.ops.knn_prepare(bank)",
        cpu_only=True,
    ),
    "prepared-other-bank": Case(
        _knn_other_bank(lambda b: _prepared_bank(seed=7)),
        VALUE,
        "prepared was made for another bank, or the bank has changed since; "
        "make it again with fastad.ops.knn_prepare(bank)",
        cpu_only=True,
    ),
    "prepared-other-shape": Case(
        _knn_other_bank(lambda b: b[:-1]),
        VALUE,
        "prepared was made for a bank of shape (2000, 64), not this bank of shape (1999, 64); "
        "make it again with fastad.ops.knn_prepare(bank)",
        cpu_only=True,
    ),
    "prepared-changed-bank": Case(
        _knn_other_bank(_changed),
        VALUE,
        "prepared was made for another bank, or the bank has changed since; "
        "make it again with fastad.ops.knn_prepare(bank)",
        cpu_only=True,
    ),
    "prepared-empty-query": Case(
        lambda dev: fastad.ops.knn(
            _randn((0, 64), "cpu"), _prepared_bank(seed=7), 1, prepared=fastad.ops.knn_prepare(_prepared_bank())
        ),
        VALUE,
        "prepared was made for another bank, or the bank has changed since; "
        "make it again with fastad.ops.knn_prepare(bank)",
        cpu_only=True,
    ),
    "prepare-1d": Case(
        lambda dev: fastad.ops.knn_prepare(_ones((5,), dev)),
        VALUE,
        "bank must be a 2-D tensor of shape (N, D), got 1-D with shape [5]",
    ),
    "prepare-empty": Case(
        lambda dev: fastad.ops.knn_prepare(_ones((0, 40), dev)), VALUE, "bank must hold at least one row, got N = 0"
    ),
    "prepare-int": Case(
        lambda dev: fastad.ops.knn_prepare(_ones((5, 40), dev, torch.int32)),
        TYPE,
        "bank must be float32, float16 or bfloat16, got Int",
    ),
}

# ---- kcenter_greedy -----------------------------------------------------------------------------


def _kcenter(shape, k, start=0, dtype=torch.float32, poison=None):
    def call(dev):
        x = _randn(shape, dev, dtype)
        if poison is not None:
            row, value = poison
            x[row, min(7, shape[1] - 1)] = value
        return fastad.ops.kcenter_greedy(x, k, start=start)

    return call


KCENTER = {
    "x-1d": Case(
        lambda dev: fastad.ops.kcenter_greedy(_ones((5,), dev), 1),
        VALUE,
        "x must be a 2-D tensor of shape (N, D), got 1-D with shape [5]",
    ),
    "x-3d": Case(
        lambda dev: fastad.ops.kcenter_greedy(_ones((5, 3, 2), dev), 1),
        VALUE,
        "x must be a 2-D tensor of shape (N, D), got 3-D with shape [5, 3, 2]",
    ),
    "x-empty": Case(_kcenter((0, 3), 1), VALUE, "x must hold at least one row, got N = 0"),
    "x-no-columns": Case(_kcenter((5, 0), 1), VALUE, "x must have at least one feature column, got D = 0"),
    "k-0": Case(_kcenter((5, 3), 0), VALUE, "k must be between 1 and the number of rows of x (5), got k = 0"),
    "k-above-n": Case(_kcenter((5, 3), 6), VALUE, "k must be between 1 and the number of rows of x (5), got k = 6"),
    "start-negative": Case(
        _kcenter((5, 3), 2, start=-1), VALUE, "start must be a row of x, between 0 and 4, got start = -1"
    ),
    "start-n": Case(_kcenter((5, 3), 2, start=5), VALUE, "start must be a row of x, between 0 and 4, got start = 5"),
    "double": Case(
        _kcenter((5, 3), 2, dtype=torch.float64),
        TYPE,
        "x must be float32, float16 or bfloat16, got Double (cast it with .float())",
    ),
    "int64": Case(
        lambda dev: fastad.ops.kcenter_greedy(_ones((5, 3), dev, torch.int64), 2),
        TYPE,
        "x must be float32, float16 or bfloat16, got Long",
    ),
    "k-float": Case(
        lambda dev: fastad.ops.kcenter_greedy(_ones((5, 3), dev), 1.5), TYPE, "k must be an int, got float 1.5"
    ),
    "k-bool": Case(
        lambda dev: fastad.ops.kcenter_greedy(_ones((5, 3), dev), True), TYPE, "k must be an int, got bool True"
    ),
    "start-str": Case(
        lambda dev: fastad.ops.kcenter_greedy(_ones((5, 3), dev), 2, start="0"),
        TYPE,
        "start must be an int, got str '0'",
    ),
    "x-none": Case(lambda dev: fastad.ops.kcenter_greedy(None, 1), TYPE, "x must be a torch.Tensor, got NoneType"),
    "start-beyond-int64": Case(
        lambda dev: fastad.ops.kcenter_greedy(_ones((5, 3), dev), 2, start=-(2**64)),
        VALUE,
        f"start must fit in a 64-bit integer, got {-(2**64)}",
    ),
    "nan-lone-row": Case(
        _kcenter((1, 20), 1, poison=(0, float("nan"))),
        VALUE,
        "x must hold only finite values, got NaN or Inf",
        cpu_only=True,
    ),
    "start-float": Case(
        lambda dev: fastad.ops.kcenter_greedy(_ones((5, 3), dev), 2, start=2.0),
        TYPE,
        "start must be an int, got float 2.0",
    ),
    "nan-start-row": Case(
        _kcenter((300, 20), 1, poison=(0, float("nan"))),
        VALUE,
        "x must hold only finite values, got NaN or Inf",
        cpu_only=True,
    ),
    "nan-other-row": Case(
        _kcenter((300, 20), 1, poison=(123, float("nan"))),
        VALUE,
        "x must hold only finite values, got NaN or Inf",
        cpu_only=True,
    ),
    "inf-other-row": Case(
        _kcenter((300, 20), 1, poison=(123, float("inf"))),
        VALUE,
        "x must hold only finite values, got NaN or Inf",
        cpu_only=True,
    ),
    "minus-inf": Case(
        _kcenter((300, 20), 1, poison=(123, -float("inf"))),
        VALUE,
        "x must hold only finite values, got NaN or Inf",
        cpu_only=True,
    ),
    "overflow": Case(
        lambda dev: fastad.ops.kcenter_greedy(torch.tensor([[0.0], [1e20], [3.0]], device=dev), 2),
        VALUE,
        "squared distances between rows of x overflow float32 (some row is too far from row 0); scale x down",
        cpu_only=True,
    ),
}

# ---- mahalanobis --------------------------------------------------------------------------------

F32, F64 = torch.float32, torch.float64


def _mahal(x_shape, mean_shape, l_shape, dtypes=(F32, F32, F32)):
    return lambda dev: fastad.ops.mahalanobis(
        *(_ones(s, dev, t) for s, t in zip((x_shape, mean_shape, l_shape), dtypes, strict=True))
    )


MAHALANOBIS = {
    "x-2d": Case(
        _mahal((4, 3), (3, 3), (3, 3, 3)), VALUE, "x must be a 3-D tensor of shape (B, P, D), got 2-D with shape [4, 3]"
    ),
    "mean-1d": Case(
        _mahal((2, 4, 3), (3,), (4, 3, 3)),
        VALUE,
        "mean must be a 2-D tensor of shape (P, D) or (1, D), got 1-D with shape [3]",
    ),
    "L-2d": Case(
        _mahal((2, 4, 3), (4, 3), (3, 3)),
        VALUE,
        "L must be a 3-D tensor of shape (Q, D, D) with Q = P or 1, got 2-D with shape [3, 3]",
    ),
    "x-double": Case(
        _mahal((2, 4, 3), (4, 3), (4, 3, 3), (F64, F32, F32)),
        TYPE,
        "x must be float32, got Double (cast it with .float())",
    ),
    "mean-double": Case(
        _mahal((2, 4, 3), (4, 3), (4, 3, 3), (F32, F64, F32)),
        TYPE,
        "mean must be float32, got Double (cast it with .float())",
    ),
    "L-half": Case(
        _mahal((2, 4, 3), (4, 3), (4, 3, 3), (F32, F32, torch.float16)),
        TYPE,
        "L must be float32, got Half (cast it with .float())",
    ),
    "x-int64": Case(
        _mahal((2, 4, 3), (4, 3), (4, 3, 3), (torch.int64, F32, F32)),
        TYPE,
        "x must be float32, got Long (cast it with .float())",
    ),
    "d-0": Case(
        _mahal((2, 4, 0), (4, 0), (4, 0, 0)), VALUE, "x must have at least one feature (D >= 1), got shape [2, 4, 0]"
    ),
    "mean-columns": Case(
        _mahal((2, 4, 3), (4, 5), (4, 3, 3)), VALUE, "mean must have D = 3 columns (x's feature size), got shape [4, 5]"
    ),
    "mean-rows": Case(
        _mahal((2, 4, 3), (2, 3), (4, 3, 3)),
        VALUE,
        "mean must have P = 4 rows (one per position of x) or 1 row (shared), got shape [2, 3]",
    ),
    "L-not-square": Case(
        _mahal((2, 4, 3), (4, 3), (4, 3, 4)),
        VALUE,
        "L must have shape (Q, D, D) with D = 3 (x's feature size), got shape [4, 3, 4]",
    ),
    "L-wrong-d": Case(
        _mahal((2, 4, 3), (4, 3), (4, 2, 2)),
        VALUE,
        "L must have shape (Q, D, D) with D = 3 (x's feature size), got shape [4, 2, 2]",
    ),
    "L-wrong-q": Case(
        _mahal((2, 4, 3), (4, 3), (2, 3, 3)),
        VALUE,
        "L must hold Q = P = 4 factors (one per position of x) or Q = 1 (shared), got Q = 2",
    ),
    "mean-other-device": Case(
        lambda dev: fastad.ops.mahalanobis(_ones((2, 4, 3), dev), _ones((4, 3), "cpu"), _ones((4, 3, 3), dev)),
        VALUE,
        "x and mean must be on the same device, got {dev} and cpu",
        cuda_only=True,
    ),
    "L-other-device": Case(
        lambda dev: fastad.ops.mahalanobis(_ones((2, 4, 3), dev), _ones((4, 3), dev), _ones((4, 3, 3), "cpu")),
        VALUE,
        "x and L must be on the same device, got {dev} and cpu",
        cuda_only=True,
    ),
    "mean-str": Case(
        lambda dev: fastad.ops.mahalanobis(_ones((2, 4, 3), dev), "mean", _ones((4, 3, 3), dev)),
        TYPE,
        "mean must be a torch.Tensor, got str",
    ),
    "unknown-isa": Case(
        _with_env("FASTAD_MAHALANOBIS_CPU_ISA", "sse2", _mahal((1, 1, 1), (1, 1), (1, 1, 1))),
        VALUE,
        "FASTAD_MAHALANOBIS_CPU_ISA must be avx512, avx2 or portable, got 'sse2'",
        cpu_only=True,
    ),
}

# ---- omp ----------------------------------------------------------------------------------------


def _omp(s, x_shape=(2, 3, 4), d_shape=(2, 5, 4), x_dtype=F32, d_dtype=F32, unit=True, tamper=None):
    def call(dev):
        atoms = _ones(d_shape, dev, d_dtype)
        if unit and len(d_shape) == 3 and d_shape[-1]:
            atoms = atoms / d_shape[-1] ** 0.5
        if tamper is not None:
            tamper(atoms)
        return fastad.ops.omp(_ones(x_shape, dev, x_dtype), atoms, s)

    return call


def _scale_atom(group, atom, factor):
    def tamper(atoms):
        atoms[group, atom] *= factor

    return tamper


def _nan_atom(atoms):
    atoms[0, 2, 0] = float("nan")


OMP = {
    "x-2d": Case(
        _omp(2, x_shape=(3, 4)), VALUE, "x must be a 3-D tensor of shape (G, M, d), got 2-D with shape [3, 4]"
    ),
    "dictionary-2d": Case(
        _omp(2, d_shape=(5, 4)), VALUE, "dictionary must be a 3-D tensor of shape (G, K, d), got 2-D with shape [5, 4]"
    ),
    "x-double": Case(_omp(2, x_dtype=F64), TYPE, "x must be float32, got Double (cast it with .float())"),
    "dictionary-half": Case(
        _omp(2, d_dtype=torch.float16), TYPE, "dictionary must be float32, got Half (cast it with .float())"
    ),
    "groups-mismatch": Case(
        _omp(2, d_shape=(3, 5, 4)),
        VALUE,
        "dictionary must hold one dictionary per group of x (G = 2), got shape [3, 5, 4]",
    ),
    "d-mismatch": Case(
        _omp(2, d_shape=(2, 5, 3)), VALUE, "dictionary atoms must have x's signal size d = 4, got shape [2, 5, 3]"
    ),
    "s-0": Case(_omp(0), VALUE, "n_nonzero must be between 1 and min(K, d) = 4 (K = 5 atoms, d = 4 features), got 0"),
    "s-above-d": Case(
        _omp(5), VALUE, "n_nonzero must be between 1 and min(K, d) = 4 (K = 5 atoms, d = 4 features), got 5"
    ),
    "s-above-k": Case(
        _omp(4, d_shape=(2, 3, 4)),
        VALUE,
        "n_nonzero must be between 1 and min(K, d) = 3 (K = 3 atoms, d = 4 features), got 4",
    ),
    "not-unit": Case(
        _omp(2, unit=False),
        VALUE,
        "dictionary atoms must have unit norm (within 1e-3), got norm 2 for atom 0 of group 0 "
        "(normalise the rows: dictionary / dictionary.norm(dim=-1, keepdim=True))",
    ),
    "one-atom-long": Case(
        _omp(2, d_shape=(2, 6, 4), tamper=_scale_atom(1, 4, 1.01)),
        VALUE,
        "dictionary atoms must have unit norm (within 1e-3), got norm 1.01 for atom 4 of group 1 "
        "(normalise the rows: dictionary / dictionary.norm(dim=-1, keepdim=True))",
    ),
    "nan-atom": Case(
        _omp(2, d_shape=(2, 6, 4), tamper=_nan_atom),
        VALUE,
        "dictionary atoms must have unit norm (within 1e-3), got norm nan for atom 2 of group 0 "
        "(normalise the rows: dictionary / dictionary.norm(dim=-1, keepdim=True))",
    ),
    "dictionary-array": Case(
        lambda dev: fastad.ops.omp(_ones((2, 3, 4), dev), _ones((2, 5, 4), "cpu").numpy(), 2),
        TYPE,
        "dictionary must be a torch.Tensor, got ndarray",
    ),
    "s-float": Case(lambda dev: _omp(2.0)(dev), TYPE, "n_nonzero must be an int, got float 2.0"),
    "reconstruct-int32": Case(
        lambda dev: fastad.ops.omp_reconstruct(
            torch.zeros(2, 3, 2, dtype=torch.int32, device=dev), torch.zeros(2, 3, 2, device=dev), _ones((2, 5, 4), dev)
        ),
        TYPE,
        "indices must be int64, got torch.int32",
    ),
    "reconstruct-2d": Case(
        lambda dev: fastad.ops.omp_reconstruct(
            torch.zeros(2, 3, dtype=torch.int64, device=dev), torch.zeros(2, 3, device=dev), _ones((2, 5, 4), dev)
        ),
        VALUE,
        "need indices and coefs (G, M, s) and dictionary (G, K, d), got shapes (2, 3), (2, 3) and (2, 5, 4)",
    ),
}

CASES: dict[str, Case] = {}
for _op, _table in (("knn", KNN), ("kcenter", KCENTER), ("mahalanobis", MAHALANOBIS), ("omp", OMP)):
    for _name, _case in _table.items():
        CASES[f"{_op}-{_name}"] = _case


def trigger(case_id: str, device: str) -> str:
    """Runs one case; returns what the call gave back when it did not raise (for the report)."""
    result = CASES[case_id].call(device)
    return f"no error; returned {type(result).__name__}"

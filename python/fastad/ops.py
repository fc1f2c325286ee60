"""Python entry points of fastad's operators, and their fake kernels for torch.compile.

Each function is a thin wrapper over ``torch.ops.fastad.<op>``: it checks what the dispatcher
would otherwise refuse with an unclear RuntimeError (arguments that are not tensors, ints beyond
int64, a ``prepared`` on another device); the C++ kernel validates everything else, in one place
for every device. The meaning of each op is in :mod:`fastad.reference`,
its shapes and dtypes in ``csrc/ops/<op>/<op>.h``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_int

_INT64 = (-(2**63), 2**63 - 1)


def _check_int64(value, name: str) -> int:
    # The schema's int is int64: a larger Python int would fail in the dispatcher with a
    # multi-line message about types.
    value = check_int(value, name, minimum=None)
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"{name} must fit in a 64-bit integer, got {value}")
    return value


def _check_tensors(**tensors) -> None:
    # A list or NumPy array would reach the dispatcher and fail there with a RuntimeError (or a
    # NotImplementedError for None) that does not say which argument was wrong.
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_prepared(prepared, bank: Tensor) -> None:
    # `prepared` takes part in dispatch: on another device than the bank it would send the call
    # to that device's kernel (a meta tensor even to the fake kernel, which returns garbage).
    if prepared is None:
        return
    _check_tensors(prepared=prepared)
    if prepared.device != bank.device:
        raise ValueError(
            f"prepared must be on the bank's device ({bank.device}), got {prepared.device}; "
            "make it with fastad.ops.knn_prepare(bank)"
        )


def knn(
    query: Tensor, bank: Tensor, k: int, *, squared: bool = False, prepared: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Exact k nearest rows of ``bank`` for every row of ``query`` in Euclidean distance.

    Args:
        query: (M, D) float32 (float16/bfloat16 are computed in float32).
        bank: (N, D), same dtype and device as ``query``.
        k: number of neighbours, 1 <= k <= N.
        squared: return squared distances.
        prepared: optional ``knn_prepare(bank)`` of this very bank, unchanged since: spares a bank
            searched many times the per-call work the CPU kernel does on it. Same results either
            way; one made for another bank raises.

    Returns:
        ``(distances, indices)``: (M, k) float32 ascending per row, and (M, k) int64 rows of
        ``bank``; equal distances are ordered by the lower index. Non-finite inputs give
        unspecified distances (indices stay valid). Memory: one tile, never an M x N matrix.
    """
    _check_tensors(query=query, bank=bank)
    _check_prepared(prepared, bank)
    return torch.ops.fastad.knn(query, bank, _check_int64(k, "k"), bool(squared), prepared)


@torch.library.register_fake("fastad::knn")
def _knn_fake(query, bank, k, squared=False, prepared=None):
    torch._check_value(query.dim() == 2, lambda: f"query must be 2-D (M, D), got {query.dim()}-D")
    torch._check_value(bank.dim() == 2, lambda: f"bank must be 2-D (N, D), got {bank.dim()}-D")
    torch._check_value(query.shape[1] == bank.shape[1], lambda: "query and bank must have the same D")
    torch._check_value(1 <= k, lambda: f"k must be at least 1, got {k}")
    torch._check_value(k <= bank.shape[0], lambda: f"k must be at most N = {bank.shape[0]}, got {k}")
    m = query.shape[0]
    return (
        query.new_empty((m, k), dtype=torch.float32),
        query.new_empty((m, k), dtype=torch.int64),
    )


def knn_prepare(bank: Tensor) -> Tensor:
    """The per-bank work of :func:`knn` done once, for a bank searched many times.

    On the CPU, ``knn`` codes the bank to int8 for its first pass on every call, about as much
    work as scoring 64 query rows against it; ``knn(query, bank, k, prepared=knn_prepare(bank))``
    skips that, which is what makes small queries (one image's patches, a single row) fast.

    Args:
        bank: (N, D) float32 (float16/bfloat16 accepted), N >= 1.

    Returns:
        A 1-D uint8 tensor on ``bank``'s device, about N x (D rounded up to 64, + 20) bytes: opaque,
        tied to this bank (``knn`` checks its shape and a fingerprint of sampled rows on every
        call) and to this build of fastad, so recompute it rather than store it. Empty where there is nothing to
        prepare (CUDA banks, D < 8, a CPU without AVX2, non-finite bank values); ``knn`` accepts
        an empty one with any bank. Prepare the bank again after changing it.
    """
    _check_tensors(bank=bank)
    return torch.ops.fastad.knn_prepare(bank)


@torch.library.register_fake("fastad::knn_prepare")
def _knn_prepare_fake(bank):
    torch._check_value(bank.dim() == 2, lambda: f"bank must be 2-D (N, D), got {bank.dim()}-D")
    size = torch.library.get_ctx().new_dynamic_size()
    return bank.new_empty((size,), dtype=torch.uint8)


def kcenter_greedy(x: Tensor, k: int, *, start: int = 0) -> tuple[Tensor, Tensor]:
    """Greedy k-center coreset of the rows of ``x`` (farthest-point rule, Gonzalez 1985).

    Starts with row ``start``, then repeatedly takes the row whose Euclidean distance to its
    nearest selected row is largest, equal distances going to the lowest index; duplicates of
    selected rows (distance 0) come last, lowest index first, and no row is taken twice.

    Args:
        x: (N, D) float32, any strides (float16/bfloat16 are computed in float32); N >= 1.
        k: number of rows to select, 1 <= k <= N.
        start: the first selected row, 0 <= start < N.

    Returns:
        ``(indices, radii)``: (k,) int64 rows of ``x`` in selection order, and (k,) float32
        distances of each selected row to the rows selected before it, at the moment it was taken:
        ``radii[0] = inf``, never increasing; every row of ``x`` lies within ``radii[-1]`` of the
        selection. Non-finite values raise on the CPU (on CUDA they give an unspecified selection
        of distinct rows). Memory: O(N) plus the (k, D) selected rows, never N x k (plus one
        contiguous float32 copy of ``x`` on the CPU when it is half or strided; on CUDA a contiguous
        copy in ``x``'s dtype when it is strided).
    """
    _check_tensors(x=x)
    return torch.ops.fastad.kcenter_greedy(x, _check_int64(k, "k"), _check_int64(start, "start"))


@torch.library.register_fake("fastad::kcenter_greedy")
def _kcenter_greedy_fake(x, k, start=0):
    torch._check_value(x.dim() == 2, lambda: f"x must be 2-D (N, D), got {x.dim()}-D")
    torch._check_value(x.shape[0] >= 1, lambda: "x must hold at least one row")
    torch._check_value(1 <= k, lambda: f"k must be at least 1, got {k}")
    torch._check_value(k <= x.shape[0], lambda: f"k must be at most N = {x.shape[0]}, got {k}")
    torch._check_value(0 <= start, lambda: f"start must be at least 0, got {start}")
    torch._check_value(start < x.shape[0], lambda: f"start must be below N = {x.shape[0]}, got {start}")
    return x.new_empty((k,), dtype=torch.int64), x.new_empty((k,), dtype=torch.float32)


def mahalanobis(x: Tensor, mean: Tensor, L: Tensor) -> Tensor:
    """Squared Mahalanobis distance of every sample at every position (PaDiM, Gaussian AD).

    ``out[b, p] = || L[q].T @ (x[b, p] - mean[m]) ||^2`` where ``L[q]`` is the lower Cholesky
    factor of the precision (inverse covariance), ``q = p`` when ``L`` holds one factor per
    position and 0 when it holds one shared factor, and likewise ``m`` for ``mean``.

    Args:
        x: (B, P, D) float32, any strides: B samples at P positions, D features (D >= 1).
        mean: (P, D) or (1, D) float32, same device: one mean per position, or one shared.
        L: (P, D, D) or (1, D, D) float32, same device: the lower-triangular factor of each
            position's precision (``precision = L @ L.T``), or one shared. Only the lower
            triangle and diagonal are read; the upper triangle is ignored, whatever it holds.

    Returns:
        (B, P) float32, non-negative; empty when B or P is 0. Values are not checked: a NaN or Inf
        in ``x[b, p]`` makes ``out[b, p]`` non-finite, one in a mean or factor every output using
        it. Memory: no (B, P, D) difference tensor; each factor is read once for the whole batch.

    Layouts: on the CPU no argument is copied. ``L`` is read where it lies when row-major
    (``L.contiguous()``) or column-major (what ``torch.linalg.cholesky`` returns), equally fast,
    so pass the factor as cholesky gives it; other strides cost a copy of one factor at a time.
    ``x`` may be channels-last (``(B, P, D)`` memory, fastest) or channels-first (a CNN's
    ``(B, D, H*W)`` output seen as ``(B, P, D)``); ``mean`` may be any view. On CUDA, arguments
    that are not contiguous are copied once per call.
    """
    _check_tensors(x=x, mean=mean, L=L)
    return torch.ops.fastad.mahalanobis(x, mean, L)


def mahalanobis_factor_layout(L: Tensor) -> Tensor:
    """``L`` in the memory layout :func:`mahalanobis` reads fastest on ``L``'s device: column-major
    on the CPU (as ``torch.linalg.cholesky`` returns factors; other layouts are transposed one
    factor at a time on every call), contiguous on CUDA. Returns ``L`` itself when it already is,
    else a copy (same values). For models that hold their factors between calls."""
    if not isinstance(L, Tensor) or L.dim() != 3:
        raise TypeError(
            f"L must be a (Q, D, D) tensor, got {type(L).__name__ if not isinstance(L, Tensor) else tuple(L.shape)}"
        )
    if L.device.type == "cpu":
        return L if L.stride(1) == 1 or L.shape[1] == 1 else L.mT.contiguous().mT
    return L.contiguous()


@torch.library.register_fake("fastad::mahalanobis")
def _mahalanobis_fake(x, mean, L):
    torch._check_value(x.dim() == 3, lambda: f"x must be 3-D (B, P, D), got {x.dim()}-D")
    torch._check_value(mean.dim() == 2, lambda: f"mean must be 2-D (P, D) or (1, D), got {mean.dim()}-D")
    torch._check_value(L.dim() == 3, lambda: f"L must be 3-D (Q, D, D), got {L.dim()}-D")
    b, p, d = x.shape
    torch._check_value(d >= 1, lambda: "x must have at least one feature (D >= 1)")
    torch._check_value(mean.shape[1] == d, lambda: f"mean must have D = {d} columns, got {mean.shape[1]}")
    torch._check_value(mean.shape[0] == p or mean.shape[0] == 1, lambda: f"mean must have P = {p} rows or 1")
    torch._check_value(L.shape[1] == d and L.shape[2] == d, lambda: f"L must be (Q, {d}, {d}), got {tuple(L.shape)}")
    torch._check_value(L.shape[0] == p or L.shape[0] == 1, lambda: f"L must hold Q = P = {p} factors or 1")
    return x.new_empty((b, p), dtype=torch.float32)


def omp(x: Tensor, dictionary: Tensor, n_nonzero: int) -> tuple[Tensor, Tensor]:
    """Orthogonal Matching Pursuit of every signal over its group's dictionary (MLF-SC's coding).

    Gives scikit-learn's ``orthogonal_mp_gram(D @ D.T, D @ x, n_nonzero_coefs=n_nonzero)`` for each
    signal, step for step: the atom of largest absolute correlation with the residual is added
    (equal values: the first in scikit-learn's order), the coefficients are the least-squares fit
    on the support, and the pursuit stops early, as scikit-learn does with float32 data, when the
    residual vanishes, the best atom is already selected, or it depends linearly on the support.
    The exact rules are in ``csrc/ops/omp/omp.h``.

    Args:
        x: (G, M, d) float32, any strides: M signals in each of G independent groups.
        dictionary: (G, K, d) float32, same device: each group's K atoms as rows, of unit norm
            (within 1e-3).
        n_nonzero: the number of atoms per signal, 1 <= n_nonzero <= min(K, d).

    Returns:
        ``(indices, coefs)``: (G, M, n_nonzero) int64 atoms in selection order, -1 in the slots an
        early stop left unused, and (G, M, n_nonzero) float32 coefficients, 0 in those slots.
        Rebuild the signals with :func:`omp_reconstruct`. CPU and CUDA (the CUDA kernel reads one flag
        back to check the atoms; the devices each path has run on: benchmarks/RESULTS.md).
    """
    _check_tensors(x=x, dictionary=dictionary)
    return torch.ops.fastad.omp(x, dictionary, _check_int64(n_nonzero, "n_nonzero"))


@torch.library.register_fake("fastad::omp")
def _omp_fake(x, dictionary, n_nonzero):
    torch._check_value(x.dim() == 3, lambda: f"x must be 3-D (G, M, d), got {x.dim()}-D")
    torch._check_value(dictionary.dim() == 3, lambda: f"dictionary must be 3-D (G, K, d), got {dictionary.dim()}-D")
    g, m, d = x.shape
    torch._check_value(dictionary.shape[0] == g, lambda: f"dictionary must hold G = {g} dictionaries")
    torch._check_value(dictionary.shape[2] == d, lambda: f"dictionary atoms must have d = {d} features")
    torch._check_value(1 <= n_nonzero, lambda: f"n_nonzero must be at least 1, got {n_nonzero}")
    torch._check_value(n_nonzero <= dictionary.shape[1], lambda: f"n_nonzero must be at most K = {dictionary.shape[1]}")
    torch._check_value(n_nonzero <= d, lambda: f"n_nonzero must be at most d = {d}")
    return (
        x.new_empty((g, m, n_nonzero), dtype=torch.int64),
        x.new_empty((g, m, n_nonzero), dtype=torch.float32),
    )


def omp_reconstruct(indices: Tensor, coefs: Tensor, dictionary: Tensor) -> Tensor:
    """The signals that :func:`omp`'s codes describe: ``sum_t coefs[..., t] * dictionary[g, indices[..., t]]``.

    Args:
        indices: (G, M, s) int64 atoms, -1 for unused slots (they contribute nothing).
        coefs: (G, M, s) floating coefficients.
        dictionary: (G, K, d) atoms as rows.

    Returns:
        (G, M, d) in the dtype of ``coefs`` and ``dictionary`` promoted (:func:`omp_error` gives
        each signal's squared error from it). Memory: a (G, M, s, d) gather.
    """
    if indices.dim() != 3 or coefs.shape != indices.shape or dictionary.dim() != 3:
        raise ValueError(
            f"need indices and coefs (G, M, s) and dictionary (G, K, d), got shapes "
            f"{tuple(indices.shape)}, {tuple(coefs.shape)} and {tuple(dictionary.shape)}"
        )
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    g, m, s = indices.shape
    if dictionary.shape[0] != g:
        raise ValueError(f"dictionary must hold G = {g} dictionaries, got shape {tuple(dictionary.shape)}")
    d = dictionary.shape[2]
    used = indices >= 0
    rows = indices.clamp_min(0).reshape(g, m * s, 1).expand(g, m * s, d)
    atoms = torch.gather(dictionary, 1, rows).reshape(g, m, s, d)
    weights = torch.where(used, coefs, torch.zeros((), dtype=coefs.dtype, device=coefs.device))
    return (weights.unsqueeze(-1) * atoms).sum(2)


def omp_error(x: Tensor, indices: Tensor, coefs: Tensor, dictionary: Tensor) -> Tensor:
    """Each signal's squared reconstruction error ``||x - omp_reconstruct(indices, coefs,
    dictionary)||^2``: (G, M), from x (G, M, d) and :func:`omp`'s codes over ``dictionary``
    (MLF-SC's patch score). Computed from the residual itself, not as ``||x||^2 - ||x_hat||^2``,
    which loses the small errors of well-reconstructed signals to cancellation."""
    return (x - omp_reconstruct(indices, coefs, dictionary)).square().sum(-1)


__all__ = [
    "kcenter_greedy",
    "knn",
    "knn_prepare",
    "mahalanobis",
    "mahalanobis_factor_layout",
    "omp",
    "omp_error",
    "omp_reconstruct",
]

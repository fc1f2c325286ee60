"""From accumulated Gaussian statistics to what a Mahalanobis distance needs:
:func:`regularized_covariance` gives the covariance a method uses (PaDiM's ``cov + 0.01 I`` or
Ledoit-Wolf shrinkage), :func:`precision_cholesky` factors its inverse once, in float64, and
:func:`precision_factors` lays the factors out for ``fastad.ops.mahalanobis``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .checks import check_choice, check_float
from .gaussian_stats import GaussianAccumulator
from .ops import mahalanobis_factor_layout

__all__ = [
    "COVARIANCE_ESTIMATORS",
    "check_regularization",
    "precision_cholesky",
    "precision_factors",
    "regularized_covariance",
]

COVARIANCE_ESTIMATORS = ("empirical", "ledoit_wolf")

_F64 = torch.float64


def check_regularization(covariance: Any, eps: Any) -> float:
    """``eps`` as a float after checking both settings of :func:`regularized_covariance`: the
    estimator's name and a finite ridge >= 0. Methods call it in their parameter checks so that a
    bad value fails before any pass over the data."""
    check_choice(covariance, "covariance", COVARIANCE_ESTIMATORS)
    return check_float(eps, "eps", minimum=0.0, meaning="the ridge added to each covariance")


def regularized_covariance(
    acc: GaussianAccumulator, covariance: str = "empirical", eps: float = 0.01, *, positions: slice | None = None
) -> Tensor:
    """The covariance a Gaussian method inverts, (P, D, D) float64 (or that of a contiguous slice
    of the positions).

    ``"empirical"``: ``acc.covariance(ddof=1) + eps * I``, PaDiM's original ``np.cov + 0.01 I``.
    ``"ledoit_wolf"``: ``acc.ledoit_wolf()[0]`` (Gaussian AD), plus ``eps * I`` when ``eps > 0``.
    """
    if not isinstance(acc, GaussianAccumulator):
        raise TypeError(f"acc must be a GaussianAccumulator, got {type(acc).__name__}")
    eps = check_regularization(covariance, eps)
    if covariance == "empirical":
        cov = acc.covariance(ddof=1, positions=positions)
    else:
        cov = acc.ledoit_wolf(positions=positions)[0]
    if eps > 0:
        cov.diagonal(dim1=-2, dim2=-1).add_(float(eps))
    return cov


# A pivot of the Cholesky factorisation below this fraction of the largest variance is
# indistinguishable from zero in float64 (the factorisation's backward error is ~ D * eps * |C|).
_PIVOT_RTOL_PER_DIM = torch.finfo(_F64).eps


def precision_cholesky(covariance: Tensor, *, first_position: int = 0) -> Tensor:
    """Lower-triangular ``L`` (Q, D, D) float64 with ``L @ L.mT == inverse(covariance)``.

    ``covariance``: (Q, D, D) symmetric positive definite, any floating dtype (factored in
    float64). The squared Mahalanobis distance of ``v = x - mean`` is then ``|v @ L|^2``, one
    matrix product per position.

    Computed without an explicit inverse: with ``J`` the exchange (anti-identity) matrix, factor
    ``J C J = K K^T`` (Cholesky, lower ``K``); then ``C^-1 = (J K^-T J)(J K^-T J)^T`` and
    ``J K^-T J`` is lower-triangular, obtained from one triangular solve.

    Raises ValueError naming the first position whose covariance is not (numerically) positive
    definite (numbered from ``first_position``, for callers that pass a slice of the positions).
    """
    if not isinstance(covariance, Tensor):
        raise TypeError(f"covariance must be a torch.Tensor of shape (Q, D, D), got {type(covariance).__name__}")
    if covariance.dim() != 3 or covariance.shape[1] != covariance.shape[2] or covariance.shape[1] == 0:
        raise ValueError(f"covariance must be (Q, D, D) with D >= 1, got shape {tuple(covariance.shape)}")
    if not covariance.is_floating_point():
        raise TypeError(f"covariance must be a floating-point tensor, got {covariance.dtype}")
    cov = covariance.detach().to(_F64)
    Q, D, _ = cov.shape
    if Q == 0:
        return cov.clone()
    finite = torch.isfinite(cov).flatten(1).all(1)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0])
        raise ValueError(f"covariance at position {first_position + first} holds NaN or infinite values")
    scale = cov.diagonal(dim1=-2, dim2=-1).abs().amax(-1)  # (Q,)
    asym = (cov - cov.mT).abs().flatten(1).amax(1)
    not_symmetric = asym > 1e-8 * scale.clamp_min(torch.finfo(_F64).tiny)
    if bool(not_symmetric.any()):
        first = int(not_symmetric.nonzero()[0])
        raise ValueError(
            f"covariance at position {first_position + first} is not symmetric "
            f"(max |C - C^T| = {float(asym[first]):.3g})"
        )
    flipped = cov.flip(-2, -1)  # J C J
    factor, info = torch.linalg.cholesky_ex(flipped)
    pivots = factor.diagonal(dim1=-2, dim2=-1)
    too_small = (pivots * pivots).amin(-1) <= D * _PIVOT_RTOL_PER_DIM * scale
    failed = (info != 0) | too_small | (scale <= 0)
    if bool(failed.any()):
        first = int(failed.nonzero()[0])
        raise ValueError(
            f"covariance at position {first_position + first} is singular or not positive definite "
            f"({int(failed.sum())} of {Q} positions fail); regularise it with eps > 0 "
            f"or use covariance='ledoit_wolf'"
        )
    eye = torch.eye(D, dtype=_F64, device=cov.device).expand(Q, D, D)
    factor_inv = torch.linalg.solve_triangular(factor, eye, upper=False)  # K^-1, lower
    return factor_inv.mT.flip(-2, -1).contiguous()  # J K^-T J, lower


_FACTOR_CHUNK_BYTES = 2 * 2**20


def precision_factors(
    acc: GaussianAccumulator, covariance: str = "empirical", eps: float = 0.01, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """What ``fastad.ops.mahalanobis`` takes: the lower Cholesky factor of every position's
    precision, (P, D, D) in ``dtype``, from ``regularized_covariance(acc, covariance, eps)``.

    Computed in float64 a few positions at a time, so that beyond the accumulator and the
    result only one chunk's float64 covariances exist. The peak is still large for the paper's
    PaDiM (Wide-ResNet-50, 3136 positions of 550 x 550): the float64 sums are 7.6 GB and the
    float32 result 3.8 GB, both on the accumulator's device. The result is in the layout the op
    reads fastest there (``fastad.ops.mahalanobis_factor_layout``): column-major on the CPU.
    Raises ValueError naming the first position whose covariance cannot be inverted.
    """
    if not isinstance(acc, GaussianAccumulator):
        raise TypeError(f"acc must be a GaussianAccumulator, got {type(acc).__name__}")
    out = mahalanobis_factor_layout(torch.empty((acc.positions, acc.dim, acc.dim), dtype=dtype, device=acc.device))
    # Chunks of about 2 MB of float64 matrices: the dozen passes over each (centring, checks,
    # flips, factor, solve) then stay in a core's L2 cache instead of streaming from memory
    # (3136 factors of 176 x 176: 1.2 s, against 28 s in chunks of 256 positions).
    step = max(1, min(acc.position_chunk, _FACTOR_CHUNK_BYTES // (acc.dim * acc.dim * 8)))
    starts = range(0, acc.positions, step)

    for start in starts:
        chunk = slice(start, min(acc.positions, start + step))
        cov = regularized_covariance(acc, covariance, eps, positions=chunk)
        out[chunk] = precision_cholesky(cov, first_position=start).to(dtype)
    return out

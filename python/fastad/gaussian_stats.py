"""Streaming Gaussian statistics for the Gaussian methods (PaDiM, Gaussian AD).

PaDiM fits one Gaussian per feature-map position, Gaussian AD (Rippel et al.) one per backbone
level. Both only need the mean and covariance of the training embeddings, so the embeddings are
never stored: :class:`GaussianAccumulator` sums them batch by batch in float64, and fitting on
10,000 images needs the same memory as fitting on 100.

Numerics. Sums of raw moments lose every digit to cancellation when the data sit far from zero
(features offset by 1e4 keep about 8 of float64's 16 digits in ``sum(x x^T) - n m m^T``). The
accumulator therefore sums moments of ``y = x - s``, where the shift ``s`` (P, D) is the mean of
the first batch: ``y`` is of the order of the spread, and the final centring removes only the
small residual ``mean(y)``.

Memory. ``update`` works on ``position_chunk`` positions at a time and adds each chunk's outer
products into the (P, D, D) sum in place (``baddbmm_``), so no per-batch (P, D, D) temporary is
ever allocated; working memory is O(B * position_chunk * D) plus the accumulators themselves.

Then ``fastad.precision`` turns the statistics into the covariance a method uses and the
factors of its inverse.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from .checks import check_int

__all__ = ["GaussianAccumulator"]

_F64 = torch.float64


def _batched_dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product of two (Q, D) tensors -> (Q,)."""
    return (a * b).sum(-1)


def _all_reduce_symmetric_(matrices: Tensor, group) -> None:
    """Sums (N, D, D) symmetric matrices over the processes in place, sending only the upper
    triangle (D (D + 1) / 2 values each, about half); the lower triangle is then its mirror."""
    import torch.distributed as dist

    d = matrices.shape[-1]
    rows, cols = torch.triu_indices(d, d, device=matrices.device)
    packed = matrices[:, rows, cols].contiguous()
    dist.all_reduce(packed, group=group)
    matrices[:, rows, cols] = packed
    matrices[:, cols, rows] = packed


def _shift_moments(
    count: int, s1: Tensor, s2: Tensor, t3: Tensor | None, q4: Tensor | None, d: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Moments of ``y + d`` from the moments of ``y`` (all for one chunk of Q positions).

    Inputs (float64): ``s1 = sum y`` (Q, D), ``s2 = sum y y^T`` (Q, D, D), ``t3 = sum |y|^2 y``
    (Q, D) and ``q4 = sum |y|^4`` (Q,) (both optional), ``d`` (Q, D). Returns new tensors, the
    inputs are left alone. With ``a = |y|^2``, ``|y + d|^2 = a + 2 y.d + |d|^2``, so summing over
    the ``n = count`` samples:

    * ``sum (y + d)               = s1 + n d``
    * ``sum (y + d)(y + d)^T      = s2 + s1 d^T + d s1^T + n d d^T``
    * ``sum |y + d|^2 (y + d)     = t3 + tr(s2) d + 2 s2 d + 2 (s1.d) d + |d|^2 s1 + n |d|^2 d``
    * ``sum |y + d|^4             = q4 + 4 t3.d + 4 d^T s2 d + 2 |d|^2 tr(s2) + 4 |d|^2 (s1.d) + n |d|^4``

    (expand the square / product and use ``sum a = tr(s2)``, ``sum a y = t3``, ``sum a^2 = q4``,
    ``sum (y.d) y = s2 d``, ``sum (y.d)^2 = d^T s2 d``). Shifting by ``d = -mean(y)`` gives the
    centred moments, e.g. the ``sum_i |x_i - mean|^4`` that Ledoit-Wolf needs and that cannot be
    summed directly while streaming because the mean is not known yet.
    """
    n = float(count)
    dd = _batched_dot(d, d)  # (Q,)
    s2d = torch.bmm(s2, d.unsqueeze(-1)).squeeze(-1)  # (Q, D)
    s1d = _batched_dot(s1, d)
    trace = s2.diagonal(dim1=-2, dim2=-1).sum(-1)
    new_q4 = new_t3 = None
    if q4 is not None and t3 is not None:
        new_q4 = (
            q4
            + 4.0 * _batched_dot(t3, d)
            + 4.0 * _batched_dot(d, s2d)
            + 2.0 * dd * trace
            + 4.0 * dd * s1d
            + n * dd * dd
        )
        new_t3 = (
            t3
            + trace.unsqueeze(-1) * d
            + 2.0 * s2d
            + 2.0 * s1d.unsqueeze(-1) * d
            + dd.unsqueeze(-1) * s1
            + n * dd.unsqueeze(-1) * d
        )
    outer = s1.unsqueeze(-1) * d.unsqueeze(-2)  # s1 d^T
    new_s2 = s2 + outer + outer.mT + n * (d.unsqueeze(-1) * d.unsqueeze(-2))
    new_s1 = s1 + n * d
    return new_s1, new_s2, new_t3, new_q4


def _symmetrize_(m: Tensor) -> Tensor:
    """Averages a (Q, D, D) batch with its transpose in place: the BLAS sums of y^T y need not be
    bitwise symmetric, and downstream Cholesky reads only one triangle."""
    m.add_(m.mT.clone()).mul_(0.5)
    return m


class GaussianAccumulator:
    """Per-position mean and covariance of (B, P, D) samples, accumulated in float64.

    Args:
        positions: P, the number of independent Gaussians (feature-map positions for PaDiM, 1 for
            a per-level Gaussian).
        dim: D, the embedding dimension.
        device: where the float64 sums live (default CPU); batches are moved there.
        fourth_moments: also sum ``|y|^4`` (P,) and ``|y|^2 y`` (P, D), which
            :meth:`ledoit_wolf` needs.
        position_chunk: positions processed at once; bounds the working memory of each call.

    State (float64, on ``device``): the shift ``s`` (P, D), ``sum y`` (P, D), ``sum y y^T``
    (P, D, D) and optionally the fourth-moment sums, with ``y = x - s``.
    """

    def __init__(
        self,
        positions: int,
        dim: int,
        *,
        device: torch.device | str | None = None,
        fourth_moments: bool = False,
        position_chunk: int = 256,
    ) -> None:
        self.positions = check_int(positions, "positions", meaning="P, the number of Gaussians")
        self.dim = check_int(dim, "dim", meaning="D, the embedding dimension")
        self.position_chunk = check_int(position_chunk, "position_chunk", meaning="positions processed at once")
        if not isinstance(fourth_moments, bool):
            raise TypeError(f"fourth_moments must be a bool, got {type(fourth_moments).__name__}")
        self.fourth_moments = fourth_moments
        try:
            self.device = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device {device!r} is not a valid torch device ({exc})") from None
        P, D = positions, dim
        self._count = 0
        self._shift = torch.zeros(P, D, dtype=_F64, device=self.device)
        self._sum = torch.zeros(P, D, dtype=_F64, device=self.device)
        self._sum_outer = torch.zeros(P, D, D, dtype=_F64, device=self.device)
        self._sum_norm2_vec: Tensor | None = None  # sum |y|^2 y  (P, D)
        self._sum_norm4: Tensor | None = None  # sum |y|^4  (P,)
        if fourth_moments:
            self._sum_norm2_vec = torch.zeros(P, D, dtype=_F64, device=self.device)
            self._sum_norm4 = torch.zeros(P, dtype=_F64, device=self.device)

    def __repr__(self) -> str:
        return (
            f"GaussianAccumulator(positions={self.positions}, dim={self.dim}, count={self._count}, "
            f"device={str(self.device)!r}, fourth_moments={self.fourth_moments})"
        )

    @property
    def count(self) -> int:
        """Samples seen per position."""
        return self._count

    def _chunks(self) -> range:
        return range(0, self.positions, self.position_chunk)

    def _range(self, positions: slice | None) -> tuple[int, int]:
        """(first, end) of a contiguous ``positions`` slice (None: all)."""
        if positions is None:
            return 0, self.positions
        if not isinstance(positions, slice) or positions.step not in (None, 1):
            raise ValueError(f"positions must be a contiguous slice (step 1) or None, got {positions!r}")
        first, end, _ = positions.indices(self.positions)
        return first, max(first, end)

    def _chunks_of(self, positions: slice | None) -> Iterator[tuple[slice, slice]]:
        """(slice into the accumulator, slice into an output that starts at the range's first
        position), one chunk of ``position_chunk`` positions at a time."""
        first, end = self._range(positions)
        for start in range(first, end, self.position_chunk):
            stop = min(end, start + self.position_chunk)
            yield slice(start, stop), slice(start - first, stop - first)

    # ------------------------------------------------------------------------------------------
    # Accumulation

    def _check_batch(self, x: object) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, P, D), got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must be 3-D (B, P={self.positions}, D={self.dim}), got shape {tuple(x.shape)}")
        B, P, D = x.shape
        if P != self.positions or D != self.dim:
            raise ValueError(
                f"x must have shape (B, P={self.positions}, D={self.dim}) to match this "
                f"accumulator, got {tuple(x.shape)}"
            )
        if B < 1:
            raise ValueError(f"x must hold at least one sample (B >= 1), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x holds NaN or infinite values; nothing was accumulated")
        return x

    @torch.no_grad()
    def update(self, x: Tensor) -> GaussianAccumulator:
        """Adds a batch ``x`` (B, P, D), any floating dtype, any device. Returns ``self``.

        The batch is validated whole before anything is summed, so an error leaves the
        accumulator as it was.
        """
        x = self._check_batch(x).detach().to(self.device)
        first = self._count == 0
        for start in self._chunks():
            chunk = slice(start, start + self.position_chunk)
            # (Pc, B, D): one batched matrix per position, for baddbmm below.
            y = x[:, chunk].to(_F64).permute(1, 0, 2)
            if first:
                self._shift[chunk] = y.mean(1)
            y = y - self._shift[chunk].unsqueeze(1)
            self._sum[chunk] += y.sum(1)
            self._sum_outer[chunk].baddbmm_(y.mT, y)  # += y^T y, in place: no (P, D, D) temporary
            if self._sum_norm4 is not None and self._sum_norm2_vec is not None:
                norm2 = (y * y).sum(-1)  # (Pc, B)
                self._sum_norm4[chunk] += (norm2 * norm2).sum(-1)
                self._sum_norm2_vec[chunk].unsqueeze(1).baddbmm_(norm2.unsqueeze(1), y)
        self._count += x.shape[0]
        return self

    def _check_compatible(self, other: object) -> GaussianAccumulator:
        if not isinstance(other, GaussianAccumulator):
            raise TypeError(f"other must be a GaussianAccumulator, got {type(other).__name__}")
        if (other.positions, other.dim) != (self.positions, self.dim):
            raise ValueError(
                f"cannot merge accumulators of different shapes: (P, D) = "
                f"({self.positions}, {self.dim}) and ({other.positions}, {other.dim})"
            )
        if self.fourth_moments and not other.fourth_moments:
            raise ValueError(
                "cannot merge: this accumulator tracks fourth moments (for Ledoit-Wolf) "
                "but other does not; build both with fourth_moments=True"
            )
        return other

    @torch.no_grad()
    def merge(self, other: GaussianAccumulator) -> GaussianAccumulator:
        """Adds the samples summarised by ``other`` (same P and D) to ``self``; returns ``self``.

        Both sides are re-shifted onto the combined mean before adding (Chan et al.'s pairwise
        combination), so the between-halves term ``n_a n_b / n (m_a - m_b)(m_a - m_b)^T`` enters
        without cancellation even when the halves have different shifts or far-apart means.
        ``other`` is not modified (merging an accumulator with itself is allowed).
        """
        self._check_compatible(other)
        if other._count == 0:
            return self
        track4 = self.fourth_moments
        o_shift = other._shift.to(self.device)
        o_sum = other._sum.to(self.device)
        if self._count == 0:
            self._shift.copy_(o_shift)
            self._sum.copy_(o_sum)
            self._sum_outer.copy_(other._sum_outer)
            if track4:
                self._sum_norm2_vec.copy_(other._sum_norm2_vec)
                self._sum_norm4.copy_(other._sum_norm4)
            self._count = other._count
            return self
        n_a, n_b = self._count, other._count
        n = n_a + n_b
        # Combined mean c = s_a + (S1_a + S1_b + n_b (s_b - s_a)) / n; each side moves by s - c.
        shift_gap = o_shift - self._shift
        d_a = -(self._sum + o_sum + n_b * shift_gap) / n
        d_b = d_a + shift_gap
        new_shift = self._shift - d_a
        for start in self._chunks():
            c = slice(start, start + self.position_chunk)

            def moments(acc: GaussianAccumulator, c: slice = c) -> tuple:
                t3 = acc._sum_norm2_vec[c].to(self.device) if track4 else None
                q4 = acc._sum_norm4[c].to(self.device) if track4 else None
                return acc._sum[c].to(self.device), acc._sum_outer[c].to(self.device), t3, q4

            a = _shift_moments(n_a, *moments(self), d_a[c])
            b = _shift_moments(n_b, *moments(other), d_b[c])
            self._sum[c] = a[0] + b[0]
            self._sum_outer[c] = a[1] + b[1]
            if track4:
                self._sum_norm2_vec[c] = a[2] + b[2]
                self._sum_norm4[c] = a[3] + b[3]
        self._shift.copy_(new_shift)
        self._count = n
        return self

    @torch.no_grad()
    def all_reduce_(self, group=None) -> GaussianAccumulator:
        """Merges the accumulators of every process of ``group`` (torch.distributed), in place on
        each: afterwards every process holds the statistics of all their samples together, as one
        process that had seen them all would (equal up to float64 rounding).

        Each process first re-centres its moments on the combined mean (one all-reduce of the
        first moments), so the sums then add without cancellation, a chunk of positions at a time
        (the symmetric second moments as their upper triangles, half the values):
        memory stays at one chunk beyond the accumulator itself, whatever P and the number of
        processes.
        """
        import torch.distributed as dist

        backend_device = self._shift.device
        count = torch.tensor([self._count], dtype=torch.int64, device=backend_device)
        dist.all_reduce(count, group=group)
        total = int(count.item())
        if total == 0:
            return self
        first = self._shift * self._count + self._sum  # sum of x over this process's samples
        dist.all_reduce(first, group=group)
        centre = first / total
        d = self._shift - centre  # moments of y + d = x - centre
        track4 = self.fourth_moments
        for start in self._chunks():
            c = slice(start, start + self.position_chunk)
            t3 = self._sum_norm2_vec[c] if track4 else None
            q4 = self._sum_norm4[c] if track4 else None
            moments = _shift_moments(self._count, self._sum[c], self._sum_outer[c], t3, q4, d[c])
            for target, value in zip(
                (self._sum, self._sum_outer, self._sum_norm2_vec, self._sum_norm4), moments, strict=True
            ):
                if value is None:
                    continue
                if target is self._sum_outer:
                    _all_reduce_symmetric_(value, group)
                else:
                    dist.all_reduce(value, group=group)
                target[c] = value
        self._shift.copy_(centre)
        self._count = total
        return self

    # ------------------------------------------------------------------------------------------
    # Results

    def _require_count(self, minimum: int, what: str) -> None:
        if self._count < minimum:
            raise ValueError(
                f"{what} needs at least {minimum} sample(s) per position, this accumulator has seen {self._count}"
            )

    def mean(self) -> Tensor:
        """The per-position mean, (P, D) float64."""
        self._require_count(1, "mean")
        return self._shift + self._sum / self._count

    def covariance(self, *, ddof: int = 1, positions: slice | None = None) -> Tensor:
        """The per-position covariance ``sum (x - mean)(x - mean)^T / (count - ddof)``, (P, D, D)
        float64 (``ddof=1``: unbiased, as ``np.cov``; ``ddof=0``: maximum likelihood).
        ``positions``: a contiguous slice of the positions, to bound the output's memory."""
        check_int(ddof, "ddof", minimum=0)
        if self._count <= ddof:
            raise ValueError(
                f"covariance with ddof={ddof} needs more than {ddof} sample(s) per "
                f"position, this accumulator has seen {self._count}"
            )
        n = self._count
        first, end = self._range(positions)
        out = self._sum_outer.new_empty((end - first, self.dim, self.dim))
        for c, o in self._chunks_of(positions):
            s1 = self._sum[c]
            # S2 - S1 S1^T / n, one chunk at a time: no temporary beyond the output itself.
            block = torch.baddbmm(self._sum_outer[c], s1.unsqueeze(-1), s1.unsqueeze(-2), alpha=-1.0 / n)
            out[o] = _symmetrize_(block).div_(n - ddof)
        return out

    def ledoit_wolf(self, *, positions: slice | None = None) -> tuple[Tensor, Tensor]:
        """Ledoit-Wolf shrunk covariance per position, as ``sklearn.covariance.ledoit_wolf``
        (``assume_centered=False``) would give on that position's samples.

        Returns ``(shrunk, shrinkage)``: (P, D, D) and (P,) float64, with
        ``shrunk = (1 - shrinkage) * emp + shrinkage * (tr(emp) / D) * I`` and ``emp`` the
        maximum-likelihood (ddof 0) covariance. Needs ``fourth_moments=True``. ``positions``: a
        contiguous slice of the positions, to bound the output's memory.
        """
        if not self.fourth_moments:
            raise ValueError(
                "ledoit_wolf needs fourth moments: build the accumulator with "
                "GaussianAccumulator(..., fourth_moments=True)"
            )
        self._require_count(1, "ledoit_wolf")
        n, p = self._count, self.dim
        first, end = self._range(positions)
        shrunk = self._sum_outer.new_empty((end - first, self.dim, self.dim))
        shrinkage = torch.zeros(end - first, dtype=_F64, device=self.device)
        for c, o in self._chunks_of(positions):
            mean_y = self._sum[c] / n
            # Centred moments: shift the sums by -mean(y) (see _shift_moments for the expansion).
            _, centred_s2, _, centred_q4 = _shift_moments(
                n, self._sum[c], self._sum_outer[c], self._sum_norm2_vec[c], self._sum_norm4[c], -mean_y
            )
            emp = _symmetrize_(centred_s2 / n)
            mu = emp.diagonal(dim1=-2, dim2=-1).sum(-1) / p  # (Pc,)
            # scikit-learn's ledoit_wolf_shrinkage, with X the centred samples:
            # delta_ = |emp|_F^2, beta_ = sum_i |x_i|^4 (the sum of X2^T X2, X2 = X**2).
            delta_ = (emp * emp).sum((-2, -1))
            beta = (centred_q4 / n - delta_) / (p * n)
            delta = (delta_ - p * mu * mu) / p
            # beta >= 0 in exact arithmetic (sum |x|^4 / n >= tr(emp)^2 >= |emp|_F^2); clamp the
            # rounding. delta = 0 means emp is already a multiple of I (always so when D = 1),
            # where scikit-learn also shrinks by 0.
            beta = torch.minimum(beta.clamp_min(0.0), delta)
            factor = torch.where(delta > 0, beta / torch.where(delta > 0, delta, 1.0), 0.0)
            if p == 1:
                factor = torch.zeros_like(factor)
            shrinkage[o] = factor
            out = shrunk[o]
            torch.mul(emp, (1.0 - factor).view(-1, 1, 1), out=out)
            out.diagonal(dim1=-2, dim2=-1).add_((factor * mu).unsqueeze(-1))
        return shrunk, shrinkage

    # ------------------------------------------------------------------------------------------
    # Serialisation

    def state_dict(self) -> dict[str, Tensor]:
        """The state as tensors only (count as a 0-d int64), ready for safetensors."""
        state = {
            "count": torch.tensor(self._count, dtype=torch.int64),
            "shift": self._shift.clone(),
            "sum": self._sum.clone(),
            "sum_outer": self._sum_outer.clone(),
        }
        if self.fourth_moments:
            state["sum_norm2_vec"] = self._sum_norm2_vec.clone()
            state["sum_norm4"] = self._sum_norm4.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> GaussianAccumulator:
        """Restores a :meth:`state_dict` of an accumulator with the same P, D and
        ``fourth_moments``; checks every entry before changing anything. Returns ``self``."""
        P, D = self.positions, self.dim
        shapes = {"shift": (P, D), "sum": (P, D), "sum_outer": (P, D, D)}
        if self.fourth_moments:
            shapes.update(sum_norm2_vec=(P, D), sum_norm4=(P,))
        expected = set(shapes) | {"count"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be a dict with keys {sorted(expected)}, got {got}")
        for key, shape in shapes.items():
            value = state[key]
            if not isinstance(value, Tensor) or tuple(value.shape) != shape or not value.is_floating_point():
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"state[{key!r}] must be a floating tensor of shape {shape}, got {got}")
        count = int(state["count"])
        if count < 0:
            raise ValueError(f"state['count'] must be >= 0, got {count}")
        self._count = count
        self._shift.copy_(state["shift"])
        self._sum.copy_(state["sum"])
        self._sum_outer.copy_(state["sum_outer"])
        if self.fourth_moments:
            self._sum_norm2_vec.copy_(state["sum_norm2_vec"])
            self._sum_norm4.copy_(state["sum_norm4"])
        return self

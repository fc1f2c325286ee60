"""Measuring a fully-convolutional function's receptive field and stride by probing it with
random inputs (the halo a tiled call needs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_int


@dataclass(frozen=True)
class ReceptiveField:
    """Measured reach of a fully-convolutional function.

    ``radius``: input pixels (Chebyshev distance) around (i*s, j*s) that output (i, j) was seen
    to depend on; ``stride``: output stride s; ``halo``: the smallest valid ``halo`` for
    :func:`tiled_apply` (radius rounded up to a multiple of s); ``probe_size``: side of the
    square input the measurement used.
    """

    radius: int
    stride: int
    halo: int
    probe_size: int


def receptive_field(
    fn_or_module: Callable[[Tensor], Tensor],
    channels: int,
    stride_hint: int | None = None,
    *,
    size: int = 64,
    max_size: int = 2048,
    trials: int = 2,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ReceptiveField:
    """Measure how far an output of ``fn_or_module`` reaches into its input (a check, not a proof).

    Method (perturbation test): on a random (1, channels, N, N) input, take the output position
    nearest the centre, (c, c) at input pixel p = c*s, and replace every input pixel farther
    than rho from p (Chebyshev) with other random values. The radius is the smallest rho for
    which that output does not change, found by bisection (monotone: a larger rho perturbs a
    subset). A random base rather than a zero input is used because on zeros a ReLU after a
    negative bias hides every dependence. The probe grows (N doubles) while the field reaches
    its border.

    It is empirical: a dependence invisible at the probed inputs (units dead for both draws,
    ties in max-pooling, data-dependent branches) is missed, and comparisons are exact, so a
    ``fn`` whose arithmetic mixes far pixels at rounding level (FFT convolution) looks global.
    Use it to choose or double-check ``halo``, and keep a margin for unseen inputs.

    Args:
        fn_or_module: callable on (1, channels, N, N); a module should be in eval mode
            (BatchNorm in training mode couples all pixels). It is not modified.
        channels: input channels C.
        stride_hint: the expected output stride; ``None`` infers it from the output size.
        size, max_size: first and largest probe side N.
        trials: independent random draws; the largest radius is kept.
        seed: seed of the random draws.
        device, dtype: of the probe; default to the module's first parameter, else CPU float32.

    Returns:
        :class:`ReceptiveField`.
    """
    if not callable(fn_or_module):
        raise TypeError(f"fn_or_module must be callable, got {type(fn_or_module).__name__}")
    channels = check_int(channels, "channels", minimum=1)
    trials = check_int(trials, "trials", minimum=1)
    size = check_int(size, "size", minimum=2)
    max_size = check_int(max_size, "max_size", minimum=size)
    if stride_hint is not None:
        stride_hint = check_int(stride_hint, "stride_hint", minimum=1)
    device, dtype = probe_placement(fn_or_module, device, dtype)
    gen = torch.Generator().manual_seed(seed)

    n = size
    while True:
        found = _probe(fn_or_module, channels, n, stride_hint, trials, gen, device, dtype)
        if found is not None:
            radius, stride = found
            return ReceptiveField(radius, stride, -(-radius // stride) * stride, n)
        if n * 2 > max_size:
            raise ValueError(
                f"receptive_field: the output still depends on the border of a {n}x{n} probe; the "
                f"field is larger than max_size={max_size} allows, or global (global pooling, "
                f"attention, BatchNorm in training mode)"
            )
        n *= 2


def probe_placement(fn, device, dtype) -> tuple[torch.device, torch.dtype]:
    param = None
    if isinstance(fn, torch.nn.Module):
        param = next(iter(fn.parameters()), None)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    if dtype is None:
        dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    return torch.device(device), dtype


def _probe(fn, channels, n, stride_hint, trials, gen, device, dtype) -> tuple[int, int] | None:
    """(radius, stride) from an n x n probe, or None when the field reaches the probe's border."""
    radius, stride = 0, None
    with torch.inference_mode():
        for _ in range(trials):
            base = torch.rand((1, channels, n, n), generator=gen, dtype=torch.float64)
            other = torch.rand((1, channels, n, n), generator=gen, dtype=torch.float64)
            base, other = base.to(device=device, dtype=dtype), other.to(device=device, dtype=dtype)
            y = fn(base)
            if stride is None:
                stride = _stride_from_output(y, n, stride_hint)
            c = (y.shape[-2] // 2, y.shape[-1] // 2)
            py, px = c[0] * stride, c[1] * stride
            reference = y[..., c[0], c[1]]
            rows = torch.arange(n, device=device).view(n, 1)
            cols = torch.arange(n, device=device).view(1, n)
            distance = torch.maximum((rows - py).abs(), (cols - px).abs())

            # changes is called only within this iteration: the loop variables it reads are current.
            def changes(rho: int) -> bool:
                probe = torch.where(distance > rho, other, base)  # noqa: B023
                return not torch.equal(fn(probe)[..., c[0], c[1]], reference)  # noqa: B023

            border = min(py, px, n - 1 - py, n - 1 - px)
            lo, hi = -1, border - 1  # to hold: changes(lo) is True, changes(hi) is False
            if radius > 0:
                # Only the largest radius is kept: a later draw searches above the one found so
                # far, and one pass tells whether it reaches further at all (most draws end there).
                if not changes(radius):
                    continue
                lo = radius
            elif not changes(-1):
                raise ValueError(
                    "receptive_field: the centre output did not change when the whole input was "
                    "replaced; it does not depend on the input (or every unit was inactive)"
                )
            if changes(border - 1):
                return None  # the field reaches the probe's outer ring, maybe beyond: probe larger
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if changes(mid):
                    lo = mid
                else:
                    hi = mid
            radius = max(radius, hi)
    return radius, stride


def _stride_from_output(y, n: int, stride_hint: int | None) -> int:
    if not isinstance(y, Tensor) or y.dim() != 4:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"receptive_field: fn must return a 4-D (N, C_out, h, w) tensor, got {got}")
    h, w = y.shape[-2:]
    if h != w:
        raise ValueError(f"receptive_field: a square {n}x{n} probe gave a non-square {h}x{w} output")
    stride = stride_hint if stride_hint is not None else max(1, round(n / h))
    if -(-n // stride) != h:
        hint = f"stride_hint={stride_hint}" if stride_hint is not None else f"inferred stride {stride}"
        raise ValueError(
            f"receptive_field: a {n}x{n} input gave a {h}x{w} output, not ceil({n}/s) with {hint}; "
            f"fn does not follow the output-size convention of tiled_apply"
        )
    return stride

"""From patch-level scores to anomaly maps, image scores and a decision threshold.

Every method shares this one pipeline (:func:`anomaly_maps`): upsample the patch map to the input
resolution, then smooth it with a Gaussian (sigma = 4 px, the value of the PatchCore / PaDiM /
SPADE papers). Image scores reduce a map to one number; the decision threshold comes from scores
of normal images only.

Everything here is plain torch: it works on builds without torchvision.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_choice, check_float

__all__ = [
    "upsample",
    "gaussian_blur",
    "image_scores",
    "good_quantile_threshold",
    "anomaly_maps",
]

UPSAMPLE_MODES = ("bilinear", "nearest", "bicubic")
REDUCTIONS = ("max", "mean", "topk_mean")


def _check_float_tensor(maps: Any, name: str) -> Tensor:
    if not isinstance(maps, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(maps).__name__}")
    if not maps.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {maps.dtype}")
    return maps


def _check_size(size: Any) -> tuple[int, int]:
    """``size`` as (H, W) of positive ints, from an int or a pair."""
    pair = (size, size) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else size
    if not isinstance(pair, (tuple, list, torch.Size)) or len(pair) != 2:
        raise ValueError(f"size must be an int or a pair (H, W), got {size!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in pair):
        raise TypeError(f"size must hold ints, got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return int(pair[0]), int(pair[1])


def upsample(maps: Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resizes anomaly maps to ``size``.

    Args:
        maps: (N, h, w) or (N, 1, h, w) floating tensor, any device.
        size: output (H, W), or one int for a square.
        mode: "bilinear" (``align_corners=False``, the half-pixel convention of PIL / OpenCV),
            "nearest" (torch's legacy nearest: source index floor(dst * h / H)) or "bicubic"
            (``align_corners=False``; it may overshoot the input's range near sharp edges).

    Returns:
        (N, H, W) tensor, same dtype and device as ``maps``.
    """
    maps = _check_float_tensor(maps, "maps")
    check_choice(mode, "mode", UPSAMPLE_MODES)
    out_size = _check_size(size)
    if maps.dim() == 4 and maps.shape[1] == 1:
        batch = maps
    elif maps.dim() == 3:
        batch = maps.unsqueeze(1)
    else:
        raise ValueError(f"maps must be (N, h, w) or (N, 1, h, w), got shape {tuple(maps.shape)}")
    align = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(batch, size=out_size, mode=mode, **align).squeeze(1)


def gaussian_blur(maps: Tensor, sigma: float = 4.0) -> Tensor:
    """Smooths each map with an isotropic Gaussian.

    The kernel is truncated at 4 sigma: its size is ``2 * int(4 * sigma + 0.5) + 1`` (as
    ``scipy.ndimage.gaussian_filter(..., truncate=4.0)``). Borders are mirrored about the edge
    pixel without repeating it (d c b | a b c d: ``F.pad(mode="reflect")``, scipy's
    ``mode="mirror"``), as torchvision's ``gaussian_blur`` and anomalib (kornia) do; the PatchCore
    and PaDiM authors' code calls scipy with its default ``mode="reflect"`` (edge repeated), which
    differs within ``radius`` pixels of the border. The result equals torchvision's
    to rounding, but the Gaussian is applied as two 1-D passes (rows, then columns): 2K instead
    of K^2 products a pixel (K = 33 at sigma 4), and no torchvision needed.

    Args:
        maps: (N, H, W) floating tensor, any device; H and W must exceed the kernel radius
            ``int(4 * sigma + 0.5)`` (reflect padding cannot pad more than the map).
        sigma: standard deviation in pixels, >= 0; 0 returns ``maps`` itself, unchanged.

    Returns:
        (N, H, W) tensor, same dtype and device.
    """
    maps = _check_float_tensor(maps, "maps")
    if maps.dim() != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {tuple(maps.shape)}")
    sigma = check_float(sigma, "sigma", minimum=0.0)
    if sigma == 0.0 or maps.numel() == 0:
        return maps
    radius = _kernel_radius(sigma)
    if radius >= min(maps.shape[-2:]):
        raise ValueError(
            f"gaussian_blur with sigma={sigma} needs maps larger than its kernel radius {radius} "
            f"in both H and W (reflect padding), got shape {tuple(maps.shape)}"
        )
    if max(maps.shape[-2:]) <= _BANDED_MAX_SIDE:
        rows = _mirrored_band(maps.shape[-2], sigma, maps.dtype, maps.device)
        cols = _mirrored_band(maps.shape[-1], sigma, maps.dtype, maps.device)
        return rows @ (maps @ cols.T)
    kernel = _gaussian_weights(sigma).to(device=maps.device, dtype=maps.dtype)
    n = maps.shape[0]
    batch = maps.unsqueeze(0)  # (1, N, H, W): each map a channel of a depthwise convolution
    batch = F.conv2d(
        F.pad(batch, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n
    )
    batch = F.conv2d(
        F.pad(batch, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n
    )
    return batch.squeeze(0)


# Up to this side the blur is two products with banded matrices (cost ~ H*W*(H+W), but at GEMM
# speed: 0.15 ms for a 224 x 224 map here, against 0.6 ms for 1-D convolutions and 4.8 ms for
# torchvision's 2-D one); beyond it the band is mostly zeros and depthwise convolutions win.
_BANDED_MAX_SIDE = 1024


def _kernel_radius(sigma: float) -> int:
    """The kernel is truncated at 4 sigma, as scipy.ndimage.gaussian_filter(truncate=4.0)."""
    return int(4.0 * sigma + 0.5)


def _gaussian_weights(sigma: float) -> Tensor:
    """The normalised 1-D kernel, (2 * radius + 1,) float64, computed in float64 so that every
    precision gets the same kernel."""
    radius = _kernel_radius(sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


@functools.lru_cache(maxsize=16)
def _mirrored_band(n: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(n, n) matrix B with B @ x = x convolved with the Gaussian under mirror padding (edge not
    repeated), for x of length n > radius: taps that fall off an edge are folded back onto their
    mirror images. Built in float64, then kept in the maps' dtype on their device: a map size
    and sigma recur call after call, so each band is made and moved once."""
    weights = _gaussian_weights(sigma)
    radius = weights.numel() // 2
    out_index = torch.arange(n).repeat_interleave(weights.numel())
    source = out_index + torch.arange(-radius, radius + 1).repeat(n)
    source = torch.where(source < 0, -source, source)  # mirror about the first pixel
    source = torch.where(source > n - 1, 2 * (n - 1) - source, source)  # and about the last
    band = torch.zeros(n, n, dtype=torch.float64)
    band.index_put_((out_index, source), weights.repeat(n), accumulate=True)
    return band.to(device=device, dtype=dtype)


def anomaly_maps(
    patch_maps: Tensor, size: int | tuple[int, int], *, mode: str = "bilinear", sigma: float = 4.0
) -> Tensor:
    """The shared pipeline: :func:`upsample` to ``size``, then :func:`gaussian_blur` with ``sigma``.

    Args:
        patch_maps: (N, h, w) or (N, 1, h, w) floating tensor of patch scores.
        size: output (H, W) (the input images' size) or one int.
        mode: upsampling mode, see :func:`upsample`.
        sigma: blur in output pixels (0 = none), see :func:`gaussian_blur`.

    Returns:
        (N, H, W) anomaly maps, same dtype and device.
    """
    return gaussian_blur(upsample(patch_maps, size, mode=mode), sigma=sigma)


def image_scores(maps: Tensor, reduce: str = "max", *, fraction: float = 0.01) -> Tensor:
    """One score per image from its anomaly map.

    Args:
        maps: (N, H, W) (or any (N, ...)) floating tensor.
        reduce: "max" (the usual choice), "mean", or "topk_mean": the mean of the
            ``k = ceil(fraction * H * W)`` highest pixels (at least 1), less sensitive to a single
            noisy pixel than the max.
        fraction: share of pixels "topk_mean" averages, in (0, 1]; ignored otherwise.

    Returns:
        (N,) tensor, same dtype and device.
    """
    maps = _check_float_tensor(maps, "maps")
    if maps.dim() < 2:
        raise ValueError(f"maps must be (N, H, W) (at least 2-D), got shape {tuple(maps.shape)}")
    check_choice(reduce, "reduce", REDUCTIONS)
    flat = maps.flatten(1)
    if flat.shape[1] == 0:
        raise ValueError(f"maps has no pixels, shape {tuple(maps.shape)}")
    if reduce == "max":
        return flat.amax(dim=1)
    if reduce == "mean":
        return flat.mean(dim=1)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise TypeError(f"fraction must be a number, got {type(fraction).__name__}")
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    k = max(1, math.ceil(float(fraction) * flat.shape[1]))
    return flat.topk(k, dim=1, sorted=False).values.mean(dim=1)


def good_quantile_threshold(good_scores: Any, quantile: float = 0.99) -> float:
    """A decision threshold (anomalous when score > threshold) from scores of normal images.

    Use images the model did not fit on (a held-back share of the training images, as
    ``AnomalyModel.fit`` does), never the test set, which would leak its labels into the decision.

    Args:
        good_scores: (M,) tensor / array / sequence of image scores of normal images, M >= 1,
            finite.
        quantile: in [0, 1]; 0.99 lets about 1 % of normal images raise an alarm.

    Returns:
        The ``quantile`` of ``good_scores`` (linear interpolation between order statistics,
        numpy's default), computed in float64.
    """
    if isinstance(good_scores, Tensor):
        good_scores = good_scores.detach().to("cpu", torch.float64).numpy()
    scores = np.asarray(good_scores)
    if scores.dtype == bool or not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
        raise TypeError(f"good_scores must hold real numbers, got dtype {scores.dtype}")
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"good_scores must be 1-D and non-empty, got shape {tuple(scores.shape)}")
    scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("good_scores contains NaN or infinite values")
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float, np.integer, np.floating)):
        raise TypeError(f"quantile must be a number, got {type(quantile).__name__}")
    if not 0.0 <= float(quantile) <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
    return float(np.quantile(scores, float(quantile)))

"""Siamese sliding inference: the fully-convolutional map against the plain window-by-window way.

The window-by-window baseline is how one would apply a classifier trained on 32x32 pairs without
the fully-convolutional identity: cut the window around every map cell from both images and run
the network on each crop pair (batched). It computes the same map (checked here) but repeats
every overlapping convolution; the fully-convolutional pass shares them. Also the exact tiled
run of the same map, and the shift-and-stitch dense maps (4x and 16x the work by design).
Throughput is reported in input megapixels per second.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastad.siamese import NetworkConfig, SiameseNet, detect_tiled, score_map
from fastad.siamese.sliding import map_geometry

SIZE = 512  # a 512 x 512 pair: 0.26 MP, 16,384 map cells at step 4


def _network() -> SiameseNet:
    torch.manual_seed(0)
    return SiameseNet(NetworkConfig()).eval()


def window_by_window(net: SiameseNet, template, inspected, batch: int = 1024) -> torch.Tensor:
    """The map of step 4 from explicit 32x32 crops, ``batch`` crop pairs per network call."""
    g = map_geometry(net, 1)
    h, w = template.shape[-2:]
    pads = (g.before, g.pad_after(w), g.before, g.pad_after(h))
    both = F.pad(torch.stack([template, inspected]), pads, mode="reflect")
    # (2, C, rows, cols, 32, 32) views of every window, without copying the image.
    windows = both.unfold(2, g.window, g.step).unfold(3, g.window, g.step)
    rows, cols = windows.shape[2:4]
    windows = windows.permute(0, 2, 3, 1, 4, 5).reshape(2, rows * cols, -1, g.window, g.window)
    out = torch.empty(rows * cols)
    with torch.inference_mode():
        for start in range(0, rows * cols, batch):
            part = windows[:, start : start + batch]
            out[start : start + batch] = net.anomaly(part[0], part[1]).flatten()
    return out.view(rows, cols)


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(1)
    template = torch.rand(3, SIZE, SIZE, generator=g)
    inspected = template.clone()
    inspected[:, 100:140, 200:260] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)
    return template, inspected


def _report(benchmark, record, name: str) -> None:
    record(benchmark, f"siamese map {SIZE}x{SIZE} (CPU)", name, 0)
    benchmark.extra_info["megapixels_per_s"] = SIZE * SIZE / 1e6 / benchmark.stats.stats.min


def test_fully_convolutional(benchmark, record, pair):
    net = _network()
    benchmark.pedantic(score_map, args=(net, *pair), rounds=3, warmup_rounds=1)
    _report(benchmark, record, "fastad score_map (fully convolutional)")


def test_window_by_window(benchmark, record, pair):
    net = _network()
    reference = score_map(net, *pair)
    result = benchmark.pedantic(window_by_window, args=(net, *pair), rounds=1, warmup_rounds=0)
    np.testing.assert_allclose(result.numpy(), reference.numpy(), atol=1e-5)
    _report(benchmark, record, "window by window (32x32 crops, batched)")


def test_tiled(benchmark, record, pair):
    net = _network()
    reference = score_map(net, *pair).numpy()
    result = benchmark.pedantic(lambda: detect_tiled(net, *pair, tile=256, progress=False), rounds=3, warmup_rounds=1)
    np.testing.assert_allclose(result, reference, atol=1e-5)
    _report(benchmark, record, "fastad detect_tiled (tile 256)")


@pytest.mark.parametrize("dense", [2, 4])
def test_dense(benchmark, record, pair, dense):
    net = _network()
    benchmark.pedantic(score_map, args=(net, *pair), kwargs={"dense": dense}, rounds=1, warmup_rounds=1)
    _report(benchmark, record, f"fastad score_map dense={dense} (step {4 // dense} px)")

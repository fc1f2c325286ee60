"""Sliding inference: every map cell is the network on its own centred crops; tiled = untiled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastad.siamese import NetworkConfig, SiameseNet, detect_tiled, score_map
from fastad.siamese.sliding import map_geometry


def _net(seed: int, dtype=torch.float64, **kw) -> SiameseNet:
    torch.manual_seed(seed)
    kw.setdefault("channels", (4, 6, 8, 8, 12))
    kw.setdefault("embed_dim", 5)
    return SiameseNet(NetworkConfig(**kw)).to(dtype).eval()


def _pair(rng, h, w, c=3, dtype=torch.float64):
    t = torch.rand(c, h, w, generator=rng, dtype=dtype)
    return t, torch.rand(c, h, w, generator=rng, dtype=dtype)


@pytest.mark.parametrize("dense", [1, 2, 4])
@pytest.mark.parametrize("padding", ["reflect", "replicate", "zeros"])
def test_every_cell_is_the_network_on_its_centred_crops(dense, padding, rng):
    net = _net(rng.initial_seed())
    h, w = 45, 38  # not multiples of any step
    template, inspected = _pair(rng, h, w)
    cells = score_map(net, template, inspected, dense=dense, padding=padding)
    g = map_geometry(net, dense)
    assert cells.shape == (-(-h // g.step), -(-w // g.step))
    mode = "constant" if padding == "zeros" else padding
    padded = (
        F.pad(torch.stack([template, inspected]), (g.before, 40, g.before, 40), mode=mode)
        if mode != "reflect"
        else None
    )
    if padded is None:  # reflection of 40 pixels needs more than the image has: pad what the map needs
        padded = F.pad(
            torch.stack([template, inspected]), (g.before, g.pad_after(w), g.before, g.pad_after(h)), mode=mode
        )
    with torch.no_grad():
        for i in range(cells.shape[0]):
            for j in range(cells.shape[1]):
                y, x = i * g.step, j * g.step  # padded coordinates of the window's corner
                crop = padded[:, :, y : y + 32, x : x + 32]
                expected = net.anomaly(crop[:1], crop[1:])[0, 0, 0]
                torch.testing.assert_close(cells[i, j], expected, rtol=1e-10, atol=1e-12)


def test_windows_are_centred_on_their_cells():
    g = map_geometry(_net(0), 1)
    # Cell i covers pixels [4i, 4i + 4); its window [4i - 14, 4i + 18) has the same centre.
    assert g.before == 14 and (g.before * 2 + g.step) == 32 and g.reach == 17 and g.halo == 20
    assert map_geometry(_net(0), 4).step == 1


@pytest.mark.parametrize("dense,tile", [(1, 24), (2, 40), (4, 17)])
def test_tiled_equals_untiled(dense, tile, rng, tmp_path):
    net = _net(rng.initial_seed(), dtype=torch.float32)
    template, inspected = _pair(rng, 97, 130, dtype=torch.float32)
    whole = score_map(net, template, inspected, dense=dense).numpy()
    tiled = detect_tiled(net, template, inspected, tile=tile, dense=dense)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5)
    # Read lazily from .npy files (H, W, C uint8) into a memory-mapped output.
    t8 = (template * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    i8 = (inspected * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.save(tmp_path / "t.npy", t8)
    np.save(tmp_path / "i.npy", i8)
    out = np.lib.format.open_memmap(tmp_path / "map.npy", mode="w+", dtype=np.float32, shape=whole.shape)
    detect_tiled(net, tmp_path / "t.npy", tmp_path / "i.npy", tile=tile, dense=dense, out=out)
    expected = score_map(
        net, torch.from_numpy(t8).permute(2, 0, 1) / 255.0, torch.from_numpy(i8).permute(2, 0, 1) / 255.0, dense=dense
    ).numpy()
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-5)


def test_batched_pairs_match_single_pairs(rng):
    net = _net(rng.initial_seed())
    t = torch.rand(3, 3, 40, 36, generator=rng, dtype=torch.float64)
    i = torch.rand(3, 3, 40, 36, generator=rng, dtype=torch.float64)
    batched = score_map(net, t, i)
    for k in range(3):
        torch.testing.assert_close(batched[k], score_map(net, t[k], i[k]))


def test_bad_inputs(rng):
    net = _net(0)
    t, i = _pair(rng, 40, 40)
    with pytest.raises(ValueError, match="same size"):
        score_map(net, t, i[:, :36])
    with pytest.raises(ValueError, match="smaller than the network's 32x32"):
        score_map(net, t[:, :31], i[:, :31])
    with pytest.raises(ValueError, match="3-channel"):
        score_map(net, t[:1], i[:1])
    with pytest.raises(ValueError, match="dense must be one of"):
        score_map(net, t, i, dense=3)
    with pytest.raises(ValueError, match="padding must be one of"):
        score_map(net, t, i, padding="circular")
    with pytest.raises(TypeError, match="floating point"):
        score_map(net, (t * 255).byte(), (i * 255).byte())
    with pytest.raises(ValueError, match="same size"):
        detect_tiled(net, t, i[:, :36], tile=32)
    with pytest.raises(ValueError, match="tile must be"):
        detect_tiled(net.float(), t.float(), i.float(), tile=2)


@pytest.mark.parametrize("padding", ["replicate", "zeros"])
def test_tiled_equals_untiled_for_every_padding(padding, rng):
    net = _net(rng.initial_seed(), dtype=torch.float32)
    template, inspected = _pair(rng, 75, 61, dtype=torch.float32)
    whole = score_map(net, template, inspected, padding=padding).numpy()
    np.testing.assert_allclose(detect_tiled(net, template, inspected, tile=20, padding=padding), whole, atol=1e-5)


def test_tiles_read_bounded_windows(rng):
    """Memory is bounded by the tile: no read is larger than the tile plus its halo."""
    from fastad.tiling import ArrayReader

    class CountingReader(ArrayReader):
        largest = 0

        def read(self, y0, y1, x0, x1):
            CountingReader.largest = max(CountingReader.largest, (y1 - y0) * (x1 - x0))
            return super().read(y0, y1, x0, x1)

    net = _net(rng.initial_seed(), dtype=torch.float32)
    template, inspected = _pair(rng, 200, 180, dtype=torch.float32)
    tile, halo = 40, map_geometry(net, 1).halo
    detect_tiled(
        net, CountingReader(template, channels_last=False), CountingReader(inspected, channels_last=False), tile=tile
    )
    assert 0 < CountingReader.largest <= (tile + 2 * halo) ** 2

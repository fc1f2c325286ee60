"""Tiled inference (fastad.tiling) against the untiled call, and the lazy readers against slices.

The reference is always the plain call on the whole (small) image, or numpy/tifffile slicing of
the whole array. Networks get random weights and non-zero biases from a fresh seed each run, so
zero-padding the image instead of cropping tiles at the border would be caught.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from fastad.tiling import (
    ArrayReader,
    NpyReader,
    TiffReader,
    TileReader,
    open_reader,
    receptive_field,
    tiled_apply,
)

# (kind, out_channels, kernel, stride, dilation); convs are padded "same" (dilation*(k-1)//2).
# Radius of a stack: sum over layers of dilation*(k-1)//2 times the stride accumulated before it.
STRIDE4_LAYERS = [
    ("conv", 6, 3, 1, 1),
    ("conv", 6, 5, 1, 2),
    ("conv", 8, 3, 2, 1),
    ("conv", 8, 3, 1, 2),
    ("maxpool", 8, 3, 2, 1),
    ("conv", 4, 5, 1, 1),
]
STRIDE2_LAYERS = [
    ("conv", 5, 5, 1, 1),
    ("conv", 5, 3, 2, 1),
    ("conv", 3, 3, 1, 3),
]


def analytic_radius(layers) -> int:
    radius, jump = 0, 1
    for _, _, k, s, d in layers:
        radius += d * (k - 1) // 2 * jump
        jump *= s
    return radius


def make_net(
    layers, in_channels: int, gen: torch.Generator, dtype=torch.float64, *, monotone: bool = False
) -> nn.Sequential:
    """Conv/ReLU/max-pool stack with random weights and biases drawn from ``gen``.

    ``monotone``: positive weights and biases and average instead of max pooling, so that on
    non-negative images every output depends strictly on every input of its receptive field (a
    ReLU or a max can otherwise hide a dependence, for some random weights, and make a test of
    the field's size pass or fail by chance)."""
    modules: list[nn.Module] = []
    c = in_channels
    for kind, c_out, k, s, d in layers:
        pad = d * (k - 1) // 2
        if kind == "conv":
            modules += [nn.Conv2d(c, c_out, k, stride=s, padding=pad, dilation=d), nn.ReLU()]
            c = c_out
        elif monotone:
            assert d == 1, "average pooling has no dilation"
            modules.append(nn.AvgPool2d(k, stride=s, padding=pad, count_include_pad=True))
        else:
            modules.append(nn.MaxPool2d(k, stride=s, padding=pad, dilation=d))
    net = nn.Sequential(*modules[:-1] if isinstance(modules[-1], nn.ReLU) else modules).to(dtype).eval()
    with torch.no_grad():
        for p in net.parameters():
            bound = 1.0 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.5
            u = torch.rand(p.shape, generator=gen, dtype=torch.float64)
            p.copy_((u if monotone else u * 2 - 1) * bound)
    return net


def untiled(net, image_chw: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return net(image_chw[None])[0].cpu().numpy()


@pytest.fixture
def net4(rng):
    return make_net(STRIDE4_LAYERS, 3, rng)


# ---------------------------------------------------------------------------------------------
# tiled_apply == untiled call
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width, tile, batch_tiles",
    [
        (157, 203, 32, 1),  # ragged bottom (29 rows) and right (11 columns) tiles
        (157, 203, 44, 3),  # batches mixing interior and clipped border windows
        (128, 96, 64, 2),  # exact multiples of the tile
        (30, 17, 64, 1),  # image smaller than one tile
        (5, 3, 8, 1),  # image smaller than the halo and barely larger than the stride
    ],
)
def test_tiled_equals_untiled_stride4(rng, net4, device, height, width, tile, batch_tiles):
    halo = analytic_radius(STRIDE4_LAYERS)  # 20, a multiple of the stride 4
    image = torch.rand((3, height, width), generator=rng).to(torch.float64)
    expected = untiled(net4, image)
    got = tiled_apply(
        net4.to(device),
        ArrayReader(image.float(), channels_last=False),
        tile=tile,
        halo=halo,
        stride=4,
        device=device,
        batch_tiles=batch_tiles,
        dtype=torch.float64,
    )
    assert got.shape == (4, math.ceil(height / 4), math.ceil(width / 4)) == expected.shape
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9, err_msg=f"seed {rng.initial_seed()}")


def test_tiled_equals_untiled_stride2_float32(rng):
    net = make_net(STRIDE2_LAYERS, 2, rng, dtype=torch.float32)
    radius = analytic_radius(STRIDE2_LAYERS)  # 2 + 1 + 6 = 9 -> halo 10
    image = torch.rand((2, 77, 91), generator=rng)
    expected = untiled(net, image)
    got = tiled_apply(net, image, tile=26, halo=radius + 1, stride=2)
    assert got.dtype == np.float32 and got.shape == expected.shape == (3, 39, 46)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=f"seed {rng.initial_seed()}")


def test_uint8_channels_last_reader(rng, net4):
    data = torch.randint(0, 256, (61, 83, 3), generator=rng, dtype=torch.uint8).numpy()
    reference_input = torch.from_numpy(data.astype(np.float64) / 255.0).permute(2, 0, 1)
    expected = untiled(net4, reference_input)
    reader = ArrayReader(data)  # (H, W, 3) is inferred as channels-last
    assert reader.shape == (3, 61, 83)
    got = tiled_apply(net4, reader, tile=24, halo=20, stride=4, batch_tiles=2, dtype=torch.float64)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=f"seed {rng.initial_seed()}")


def test_too_small_halo_changes_the_result(rng):
    net4 = make_net(STRIDE4_LAYERS, 3, rng, monotone=True)
    image = torch.rand((3, 96, 96), generator=rng).to(torch.float64)
    expected = untiled(net4, image)
    exact = tiled_apply(net4, image, tile=32, halo=20, stride=4, dtype=torch.float64)
    short = tiled_apply(net4, image, tile=32, halo=16, stride=4, dtype=torch.float64)
    assert np.abs(exact - expected).max() < 1e-9
    assert np.abs(short - expected).max() > 1e-4, "a halo below the radius should be visible"


def test_check_halo_measures_the_field(rng):
    net4 = make_net(STRIDE4_LAYERS, 3, rng, monotone=True)
    image = torch.rand((3, 40, 40), generator=rng)
    with pytest.raises(ValueError, match="halo=16 is smaller than fn's measured receptive-field radius 20"):
        tiled_apply(net4, image, tile=16, halo=16, stride=4, check_halo=True)
    got = tiled_apply(net4, image, tile=16, halo=20, stride=4, check_halo=True)
    np.testing.assert_allclose(got, untiled(net4, image.double()), rtol=0, atol=1e-5)


def test_writes_into_preallocated_memmap(rng, net4, tmp_path):
    image = torch.rand((3, 50, 70), generator=rng)
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=(4, 13, 18))
    result = tiled_apply(net4.float(), image, tile=16, halo=20, stride=4, out=out)
    assert result is out
    out.flush()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), untiled(net4.float(), image), rtol=0, atol=1e-5)


def test_progress_bar_when_asked(rng, capsys):
    tiled_apply(lambda x: x * 2, torch.rand((1, 10, 10), generator=rng), tile=4, halo=0, progress=True)
    assert "tile" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tile=32, halo=18, stride=4), "halo=18 must be a multiple of stride=4"),
        (dict(tile=30, halo=20, stride=4), "tile=30 must be a multiple of stride=4"),
        (dict(tile=32, halo=-4, stride=4), "halo must be a non-negative int"),
        (dict(tile=32, halo=20, stride=0), "stride must be a positive int"),
        (dict(tile=32, halo=20, stride=4, batch_tiles=0), "batch_tiles must be a positive int"),
    ],
)
def test_bad_tiling_arguments_raise(net4, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiled_apply(net4, torch.zeros((3, 40, 40)), **kwargs)


class TfSamePadded(nn.Module):
    """Two stride-2 convolutions padded like TensorFlow's "same": an even input gets its extra
    padding pixel at the end, an odd one gets one on each side, so the sampling grid follows the
    parity of the input; then a stride-1 layer back to the stride-2 grid's neighbours, and an
    upsampling of the stride-4 map to stride 2 (a map finer than the deepest stride)."""

    def __init__(self, gen):
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, stride=2)
        self.b = nn.Conv2d(5, 4, 3, stride=2)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3

    @staticmethod
    def same(x):
        pads = []
        for n in (x.shape[-1], x.shape[-2]):
            total = max((-(-n // 2) - 1) * 2 + 3 - n, 0)
            pads += [total // 2, total - total // 2]
        return torch.nn.functional.pad(x, pads)

    def forward(self, x):
        half = torch.relu(self.a(self.same(x)))
        quarter = self.b(self.same(half))
        up = torch.nn.functional.interpolate(quarter, scale_factor=2, mode="bilinear", align_corners=False)
        return up[..., : half.shape[-2], : half.shape[-1]] + half[:, :4]


@pytest.mark.parametrize("size", [(61, 45), (64, 40), (59, 62)])
def test_same_padding_keeps_the_untiled_grid(rng, size):
    # Output at stride 2, strided layers down to stride 4: windows aligned to 4, and with
    # same_padding each window's length keeps the image's residue modulo 4.
    net = TfSamePadded(rng).eval()
    image = torch.rand((3, *size), generator=rng)
    with torch.no_grad():
        expected = net(image[None])[0].numpy()
    kwargs = dict(tile=8, halo=16, stride=2, align=4)
    got = tiled_apply(net, image, same_padding=True, **kwargs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    if size[0] % 4 or size[1] % 4:  # without it some windows sample another grid
        assert not np.allclose(tiled_apply(net, image, **kwargs), expected, rtol=1e-5, atol=1e-5)


def test_align_must_hold_the_stride_and_tile_and_halo(net4):
    with pytest.raises(ValueError, match="align=6 must be a multiple of stride=4"):
        tiled_apply(net4, torch.zeros((3, 40, 40)), tile=24, halo=24, stride=4, align=6)
    with pytest.raises(ValueError, match="tile=24 must be a multiple of align=16"):
        tiled_apply(net4, torch.zeros((3, 40, 40)), tile=24, halo=32, stride=4, align=16)
    with pytest.raises(ValueError, match="halo=24 must be a multiple of align=16"):
        tiled_apply(net4, torch.zeros((3, 40, 40)), tile=32, halo=24, stride=4, align=16)


def test_bad_out_raises(net4):
    image = torch.zeros((3, 41, 40))  # output must be (4, 11, 10)
    with pytest.raises(ValueError, match=r"\(C_out, 11, 10\)"):
        tiled_apply(net4, image, tile=16, halo=20, stride=4, out=np.zeros((4, 10, 10), np.float32))
    with pytest.raises(ValueError, match="out has 2 channels but fn returns 4"):
        tiled_apply(net4, image, tile=16, halo=20, stride=4, out=np.zeros((2, 11, 10), np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        tiled_apply(net4, image, tile=16, halo=20, stride=4, out=np.zeros((4, 11, 10), np.int32))


def test_output_size_that_breaks_the_stride_rule_raises():
    valid_conv = nn.Conv2d(1, 1, 3)  # no padding: h - 2 outputs, not h
    with pytest.raises(ValueError, match=r"ceil\(h/s\)"):
        tiled_apply(valid_conv, torch.zeros((1, 20, 20)), tile=8, halo=2)
    floor_pool = nn.MaxPool2d(2)  # floor(21 / 2) = 10 != ceil(21 / 2): caught on the ragged tile
    with pytest.raises(ValueError, match="fn returned shape"):
        tiled_apply(floor_pool, torch.zeros((1, 21, 21)), tile=8, halo=2, stride=2)
    ceil_pool, image = nn.MaxPool2d(2, ceil_mode=True), torch.arange(441.0).view(1, 21, 21)
    np.testing.assert_array_equal(  # with ceil_mode it follows the rule, and tiles stitch exactly
        tiled_apply(ceil_pool, image, tile=8, halo=2, stride=2), ceil_pool(image[None])[0].numpy()
    )


# ---------------------------------------------------------------------------------------------
# receptive_field
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, stride",
    [
        (STRIDE4_LAYERS, 4),
        (STRIDE2_LAYERS, 2),
        ([("conv", 4, 3, 1, 1), ("conv", 4, 5, 1, 3)], 1),
        ([("conv", 4, 7, 1, 4), ("conv", 4, 7, 1, 4), ("conv", 4, 3, 2, 1)], 2),  # radius 25, halo 26
    ],
)
def test_receptive_field_matches_the_analytic_radius(rng, layers, stride):
    net = make_net(layers, 3, rng, monotone=True)
    rf = receptive_field(net, 3)
    radius = analytic_radius(layers)
    assert (rf.radius, rf.stride, rf.halo) == (radius, stride, -(-radius // stride) * stride)
    assert receptive_field(net, 3, stride_hint=stride).radius == radius


def test_receptive_field_grows_the_probe_and_takes_plain_functions():
    def box_blur(x):  # radius 20: larger than a first 32-pixel probe can show
        return torch.nn.functional.avg_pool2d(x, 41, stride=1, padding=20, count_include_pad=True)

    rf = receptive_field(box_blur, 2, size=32)
    assert (rf.radius, rf.stride, rf.halo) == (20, 1, 20)
    assert rf.probe_size > 32


def test_receptive_field_errors():
    with pytest.raises(ValueError, match="max_size"):
        receptive_field(lambda x: x - x.mean(), 1, max_size=128)  # global dependence
    with pytest.raises(ValueError, match="not ceil"):
        receptive_field(nn.Conv2d(1, 1, 3), 1)  # valid conv breaks the size convention
    with pytest.raises(ValueError, match="stride_hint=3"):
        receptive_field(nn.Conv2d(1, 1, 3, stride=2, padding=1), 1, stride_hint=3)
    with pytest.raises(ValueError, match="does not depend on the input"):
        receptive_field(lambda x: torch.zeros_like(x), 1)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def as_unit_chw(array: np.ndarray, layout: str) -> np.ndarray:
    """Independent reference: (C, H, W) float64, integers divided by their type's maximum."""
    a = array[None] if layout == "hw" else array.transpose(2, 0, 1) if layout == "hwc" else array
    a = a.astype(np.float64)
    if np.issubdtype(array.dtype, np.integer):
        a /= np.iinfo(array.dtype).max
    return a


def random_regions(gen: np.random.Generator, h: int, w: int, n: int = 6):
    yield 0, h, 0, w
    yield h - 1, h, w - 1, w
    for _ in range(n):
        y0, x0 = int(gen.integers(0, h)), int(gen.integers(0, w))
        yield y0, int(gen.integers(y0 + 1, h + 1)), x0, int(gen.integers(x0 + 1, w + 1))


def check_reader(reader: TileReader, reference_chw: np.ndarray, gen: np.random.Generator) -> None:
    assert isinstance(reader, TileReader)
    assert reader.shape == reference_chw.shape
    for y0, y1, x0, x1 in random_regions(gen, *reference_chw.shape[1:]):
        region = reader.read(y0, y1, x0, x1)
        assert region.dtype == torch.float32 and region.shape == (reference_chw.shape[0], y1 - y0, x1 - x0)
        np.testing.assert_allclose(region.numpy(), reference_chw[:, y0:y1, x0:x1], rtol=1e-7, atol=0)


@pytest.fixture
def np_gen(rng) -> np.random.Generator:
    return np.random.default_rng(rng.initial_seed())


@pytest.mark.parametrize(
    "shape, dtype, layout, fortran",
    [
        ((37, 53, 3), np.uint8, "hwc", False),
        ((41, 29), np.uint16, "hw", False),
        ((5, 23, 31), np.float32, "chw", False),
        ((19, 27, 4), np.uint8, "hwc", True),
        ((2, 17, 13), np.float64, "chw", True),
    ],
)
def test_npy_reader_reads_slices(tmp_path, np_gen, shape, dtype, layout, fortran):
    if np.issubdtype(dtype, np.integer):
        data = np_gen.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    else:
        data = np_gen.standard_normal(shape).astype(dtype)
    if fortran:
        data = np.asfortranarray(data)
    np.save(tmp_path / "image.npy", data)
    channels_last = None if shape[-1] <= 4 or shape[0] <= 4 else layout == "hwc"
    reader = NpyReader(tmp_path / "image.npy", channels_last=channels_last)
    assert reader.dtype == dtype
    check_reader(reader, as_unit_chw(data, layout), np_gen)


def test_array_reader_layouts(np_gen):
    data = np_gen.integers(0, 256, (12, 20, 16), dtype=np.uint8)  # ambiguous: 12 and 16 channels?
    with pytest.raises(ValueError, match="channels_last"):
        ArrayReader(data)
    check_reader(ArrayReader(data, channels_last=True), as_unit_chw(data, "hwc"), np_gen)
    check_reader(ArrayReader(data, channels_last=False), as_unit_chw(data, "chw"), np_gen)
    tensor = torch.from_numpy(data[:3].copy())  # (3, 20, 16) torch uint8, channels first
    check_reader(ArrayReader(tensor), as_unit_chw(data[:3], "chw"), np_gen)
    check_reader(ArrayReader(data[..., 0] > 100), as_unit_chw(data[..., 0] > 100, "hw"), np_gen)


def test_reader_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        ArrayReader(np.zeros((2, 3, 4, 5)))
    with pytest.raises(TypeError, match="dtype"):
        ArrayReader(np.zeros((8, 8), dtype=np.complex64))
    with pytest.raises(TypeError, match="numpy array"):
        ArrayReader([[0.0]])
    reader = ArrayReader(np.zeros((10, 12)))
    with pytest.raises(ValueError, match="outside the image of H=10, W=12"):
        reader.read(0, 11, 0, 5)
    with pytest.raises(ValueError, match="empty"):
        reader.read(3, 3, 0, 5)


def test_npy_reader_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        NpyReader(tmp_path / "missing.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match="junk.npy"):
        NpyReader(tmp_path / "junk.npy")


@pytest.fixture
def tifffile():
    return pytest.importorskip("tifffile", reason="TiffReader needs tifffile (it comes with scikit-image)")


def test_tiff_reader_reads_slices(tmp_path, np_gen, tifffile):
    rgb = np_gen.integers(0, 256, (45, 67, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb)
    planar = np_gen.integers(0, 256, (3, 33, 21), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    gray = np_gen.integers(0, 65536, (31, 26)).astype(">u2")  # big-endian uint16
    tifffile.imwrite(tmp_path / "gray.tiff", gray, byteorder=">")
    bands = np_gen.standard_normal((6, 25, 19)).astype(np.float32)
    tifffile.imwrite(tmp_path / "bands.tif", bands, photometric="minisblack")
    layouts = {"rgb.tif": "hwc", "planar.tif": "chw", "gray.tiff": "hw", "bands.tif": "chw"}
    for name, layout in layouts.items():
        stored = tifffile.imread(tmp_path / name)  # independent decode of the whole file
        reader = open_reader(tmp_path / name)
        assert isinstance(reader, TiffReader)
        check_reader(reader, as_unit_chw(stored, layout), np_gen)
        mapped = tifffile.memmap(tmp_path / name, mode="r")  # the layout TiffReader maps
        np.testing.assert_array_equal(mapped, stored)


@pytest.mark.parametrize(
    "write_kwargs, match",
    [(dict(compression="zlib"), "compressed"), (dict(tile=(16, 16)), "TIFF tiles")],
)
def test_tiff_reader_refuses_layouts_it_cannot_read_lazily(tmp_path, tifffile, write_kwargs, match):
    tifffile.imwrite(tmp_path / "x.tif", np.zeros((40, 40, 3), np.uint8), **write_kwargs)
    with pytest.raises(ValueError, match=match) as info:
        TiffReader(tmp_path / "x.tif")
    assert ".npy" in str(info.value) and "uncompressed" in str(info.value)


def test_open_reader_dispatch(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((8, 9, 3), np.uint8))
    assert isinstance(open_reader(str(tmp_path / "a.npy")), NpyReader)
    assert isinstance(open_reader(np.zeros((8, 9))), ArrayReader)
    reader = ArrayReader(torch.zeros(2, 8, 9))
    assert open_reader(reader) is reader
    with pytest.raises(ValueError, match="supported: .npy, .tif, .tiff"):
        open_reader(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError):
        open_reader(tmp_path / "nothing.tif")
    with pytest.raises(TypeError, match="expected a path"):
        open_reader(42)


# ---------------------------------------------------------------------------------------------
# Memory: a 20,000 x 20,000 RGB image (1.2 GB) through a bounded footprint
# ---------------------------------------------------------------------------------------------

BIG = 20_000
CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from torch import nn
    from fastad.tiling import ArrayReader, NpyReader, tiled_apply

    def peak_rss_kib():
        # VmHWM, not resource.getrusage's ru_maxrss: on Linux ru_maxrss keeps the parent's peak
        # across fork/exec, so a child of a big pytest process would report that and see no growth.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    torch.set_num_threads(2)
    image_path, out_path, net_path, how = sys.argv[1:5]
    net = nn.Sequential(
        nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, stride=2, padding=1)
    )
    net.load_state_dict(torch.load(net_path, weights_only=True))
    net.eval()
    tiled_apply(net, np.zeros((300, 300, 3), np.uint8), tile=512, halo=4, stride=4)  # warm up torch
    # "memmap" (a held np.memmap, whose read pages stay resident) is the control that shows
    # what the test catches; the test itself runs "npy".
    reader = NpyReader(image_path) if how == "npy" else ArrayReader(np.load(image_path, mmap_mode="r"))
    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(1, 5000, 5000))
    before = peak_rss_kib()
    tiled_apply(net, reader, tile=512, halo=4, stride=4, out=out)
    after = peak_rss_kib()
    out.flush()
    print(json.dumps({"growth_kib": after - before}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from Linux's /proc/self/status")
def test_huge_image_in_bounded_memory(tmp_path, rng):
    image_path, out_path, net_path = tmp_path / "big.npy", tmp_path / "out.npy", tmp_path / "net.pt"
    try:
        # Fill in row blocks with a pattern (so every page is real), block by block.
        image = np.lib.format.open_memmap(image_path, mode="w+", dtype=np.uint8, shape=(BIG, BIG, 3))
        rows = 500
        y, x, c = np.ogrid[:rows, :BIG, :3]
        block = ((y * 7 + x * 13 + c * 101 + ((x * y) >> 5)) % 256).astype(np.uint8)
        for k, y0 in enumerate(range(0, BIG, rows)):
            np.add(block, np.uint8(k * 53 % 256), out=image[y0 : y0 + rows])
        image.flush()
        del image, block

        net = nn.Sequential(
            nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, stride=2, padding=1)
        ).eval()
        with torch.no_grad():  # fresh-seed weights, like the other tests
            for p in net.parameters():
                p.copy_(torch.rand(p.shape, generator=rng) - 0.5)
        torch.save(net.state_dict(), net_path)

        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(image_path), str(out_path), str(net_path), "npy"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        growth_mib = json.loads(done.stdout.strip().splitlines()[-1])["growth_kib"] / 1024
        # The image is 1144 MiB and the float32 output 95 MiB; reading through np.memmap without
        # unmapping would add the whole image to the resident set.
        assert growth_mib < 300, f"peak RSS grew by {growth_mib:.0f} MiB"

        # Local net (radius 3): a crop with a margin of 8 pixels gives the same outputs inside.
        reader, out = NpyReader(image_path), np.load(out_path, mmap_mode="r")
        net64 = net.double()
        assert out.shape == (1, 5000, 5000)
        margin, size = 8, 96
        # Corners (image borders, the ragged last tile) and crops straddling tile seams.
        corners = [(0, 0), (BIG - size, BIG - size), (0, 512 * 20 - 44), (7776, 0)]
        for cy, cx in corners + [(512 * 9 - 48, 512 * 30 - 40)]:
            crop = reader.read(cy, cy + size, cx, cx + size).double()
            with torch.no_grad():
                expected = net64(crop[None])[0].numpy()
            top = 0 if cy == 0 else margin // 4
            left = 0 if cx == 0 else margin // 4
            bottom = size // 4 - (0 if cy + size == BIG else margin // 4)
            right = size // 4 - (0 if cx + size == BIG else margin // 4)
            got = out[:, cy // 4 + top : cy // 4 + bottom, cx // 4 + left : cx // 4 + right]
            np.testing.assert_allclose(
                got, expected[:, top:bottom, left:right], rtol=0, atol=1e-5, err_msg=f"crop at {(cy, cx)}"
            )
        del out
    finally:
        for p in (image_path, out_path, net_path):
            p.unlink(missing_ok=True)


def test_tiled_cores_and_windows_say_where_each_tile_lies(rng):
    # The cores of tiled_cores placed at their (oy, ox) rebuild tiled_apply's output; tile_windows
    # covers the image once with cores and gives each window's pixels.
    from fastad.tiling import tile_windows, tiled_cores, tiled_sum

    conv = nn.Conv2d(3, 5, 5, stride=4, padding=2)
    image = torch.rand(3, 70, 90, generator=rng)
    with torch.inference_mode():
        whole = tiled_apply(conv, image, tile=24, halo=8, stride=4)
        rebuilt = np.full(whole.shape, np.nan, dtype=np.float32)
        for (oy, ox), core in tiled_cores(conv, image, tile=24, halo=8, stride=4):
            rebuilt[:, oy : oy + core.shape[1], ox : ox + core.shape[2]] = core.numpy()
    np.testing.assert_array_equal(rebuilt, whole)
    total, count = tiled_sum(conv, image, tile=24, halo=8, stride=4)
    np.testing.assert_allclose(total.numpy(), whole.sum(axis=(1, 2), dtype=np.float64), rtol=1e-6)
    assert count == whole.shape[1] * whole.shape[2]
    covered = np.zeros((70, 90), dtype=int)
    for (y0, y1, x0, x1), (ya, yb, xa, xb), pixels in tile_windows(image, tile=32, halo=16, align=16):
        covered[y0:y1, x0:x1] += 1
        assert ya == max(0, y0 - 16) and yb == min(70, y1 + 16) and xa % 16 == 0
        torch.testing.assert_close(pixels, image[:, ya:yb, xa:xb], rtol=0, atol=0)
    assert (covered == 1).all()

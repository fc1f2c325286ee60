"""load_image / load_mask under generated inputs: they never crash, and they either decode a file
correctly or raise a ValueError that names it.

The contract checked here, for every file a property makes:

- a file that decodes gives float32 RGB (3, H, W) in [0, 1] (``load_image``) or bool (H, W)
  (``load_mask``), equal to what the stored pixels say, computed independently in numpy;
- a missing file raises FileNotFoundError; every other failure is a ValueError whose message holds
  the file's path: never another exception type, never an image with missing pixels.

tests/data/test_images.py holds the plain, one-example-per-mode tests; this file generates sizes
(1 x 1, 1 x W and H x 1 strips), storage modes, formats, pixel patterns, EXIF orientations, cut
offsets and corrupted bytes. Each property runs the examples of the Hypothesis profile
(FASTAD_HYPOTHESIS=fast or long, tests/conftest.py).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import currently_in_test_context, given, note
from hypothesis import strategies as st
from PIL import Image, ImageFile, features

from fastad.data import load_image, load_mask

HAS_WEBP = features.check("webp")

# Storage modes: PIL modes, plus "PT" (palette with a transparent index).
_TIFF_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "CMYK")
# format -> (suffix, PIL save options, modes it stores exactly)
_LOSSLESS = {
    "png": (".png", {}, ("1", "L", "LA", "P", "PT", "RGB", "RGBA", "I;16")),
    "tiff": (".tif", {}, _TIFF_MODES),
    "tiff-lzw": (".tif", {"compression": "tiff_lzw"}, _TIFF_MODES),
    "tiff-deflate": (".tif", {"compression": "tiff_adobe_deflate"}, _TIFF_MODES),
    "tiff-packbits": (".tif", {"compression": "packbits"}, _TIFF_MODES),
    "bmp": (".bmp", {}, ("1", "L", "P", "RGB", "RGBA")),
    "gif": (".gif", {}, ("L", "P")),
}
if HAS_WEBP:  # exact: keep the colour of fully transparent pixels
    _LOSSLESS["webp"] = (".webp", {"lossless": True, "exact": True}, ("L", "LA", "RGB", "RGBA"))
_LOSSY = {"jpeg": (".jpg", {"quality": 90}, ("L", "RGB", "CMYK"))}
_FORMATS = {**_LOSSLESS, **_LOSSY}
_PIL_FORMAT = {"png": "PNG", "bmp": "BMP", "gif": "GIF", "webp": "WEBP", "jpeg": "JPEG"}

# Modes whose mask is unambiguous: grey levels (colour and palette images get grey colours, on
# which every luminance formula agrees).
_MASK_MODES = ("1", "L", "LA", "P", "PT", "RGB", "RGBA", "I;16")


# ----------------------------------------------------------------------------- generated images


@dataclass(frozen=True)
class Case:
    fmt: str
    mode: str
    height: int
    width: int
    pattern: str  # noise | zero | full | black-last-row
    seed: int
    palette_size: int  # P / PT: entries in the palette (2, 4, 16 make PIL write 1-, 2-, 4-bit PNGs)
    grey: bool  # colour and palette images hold grey colours only (for masks)

    @property
    def suffix(self) -> str:
        return _FORMATS[self.fmt][0]


@dataclass
class Pixels:
    """What a case stores: ``values`` (H, W) or (H, W, C) in the mode's own units (bool for "1",
    uint16 for "I;16", palette indices for "P"), and the palette for "P"/"PT"."""

    mode: str
    values: np.ndarray
    palette: np.ndarray | None = None  # (n, 3) uint8


_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}

sizes = st.one_of(
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.tuples(st.just(1), st.integers(1, 700)),  # 1 x W strip
    st.tuples(st.integers(1, 700), st.just(1)),  # H x 1 strip
)


@st.composite
def cases(draw, formats=tuple(_FORMATS), modes=None, grey: bool = False) -> Case:
    pairs = [(f, m) for f in formats for m in _FORMATS[f][2] if modes is None or m in modes]
    fmt, mode = draw(st.sampled_from(pairs))
    height, width = draw(sizes)
    return Case(
        fmt,
        mode,
        height,
        width,
        pattern=draw(st.sampled_from(["noise", "zero", "full", "black-last-row"])),
        seed=draw(st.integers(0, 2**32 - 1)),
        palette_size=draw(st.sampled_from([2, 4, 16, 256])),
        grey=grey,
    )


def pixels_of(case: Case) -> Pixels:
    rng = np.random.default_rng(case.seed)
    shape = (case.height, case.width)
    if case.mode == "1":
        values = rng.random(shape) < 0.5
    elif case.mode == "I;16":
        values = rng.integers(0, 65536, shape).astype(np.uint16)
    elif case.mode in ("P", "PT"):
        values = rng.integers(0, case.palette_size, shape).astype(np.uint8)
    elif case.grey and case.mode in ("RGB", "RGBA"):
        grey = rng.integers(0, 256, shape, dtype=np.uint8)
        values = np.stack(
            [grey] * 3 + ([rng.integers(0, 256, shape, dtype=np.uint8)] if case.mode == "RGBA" else []), axis=-1
        )
    else:
        channels = _CHANNELS[case.mode]
        values = rng.integers(0, 256, shape + ((channels,) if channels > 1 else ()), dtype=np.uint8)
    top = True if values.dtype == bool else np.iinfo(values.dtype).max
    if case.mode in ("P", "PT"):
        top = case.palette_size - 1
    if case.pattern == "zero":
        values[...] = 0
    elif case.pattern == "full":
        values[...] = top
    elif case.pattern == "black-last-row":  # the case where fastad re-checks a PNG's pixel data
        values[-1] = 0
    palette = None
    if case.mode in ("P", "PT"):
        if case.grey:
            palette = np.repeat(rng.integers(0, 256, (case.palette_size, 1), dtype=np.uint8), 3, axis=1)
        else:
            palette = rng.integers(0, 256, (case.palette_size, 3), dtype=np.uint8)
    return Pixels(case.mode, values, palette)


def pil_image(px: Pixels) -> Image.Image:
    height, width = px.values.shape[:2]
    if px.mode in ("1", "I;16", "L"):
        return Image.fromarray(px.values)
    if px.mode in ("P", "PT"):
        image = Image.frombytes("P", (width, height), px.values.tobytes())
        image.putpalette(px.palette.tobytes())
        return image
    return Image.frombytes(px.mode, (width, height), np.ascontiguousarray(px.values).tobytes())


def encode(case: Case, px: Pixels, exif: bytes | None = None) -> bytes:
    suffix, options, _ = _FORMATS[case.fmt]
    options = dict(options)
    if px.mode == "PT":
        options["transparency"] = int(px.values.flat[0])
    if exif is not None:
        options["exif"] = exif
    buffer = io.BytesIO()
    pil_image(px).save(buffer, format=_PIL_FORMAT.get(case.fmt, "TIFF"), **options)
    return buffer.getvalue()


def _unit(values: np.ndarray, top: int) -> np.ndarray:
    """values / top in float32, the way fastad divides (float32(value) / float32(top))."""
    return values.astype(np.float32) / np.float32(top)


def expected_rgb(px: Pixels) -> np.ndarray:
    """(3, H, W) float32 from the stored samples, computed in numpy: grey repeated, 16-bit over
    65535, palette looked up, alpha dropped, CMYK by the plain (profile-free) formula."""
    v = px.values
    if px.mode == "1":
        rgb = np.repeat(v[..., None].astype(np.float32), 3, axis=-1)
    elif px.mode == "I;16":
        rgb = np.repeat(_unit(v, 65535)[..., None], 3, axis=-1)
    elif px.mode == "L":
        rgb = np.repeat(_unit(v, 255)[..., None], 3, axis=-1)
    elif px.mode == "LA":
        rgb = np.repeat(_unit(v[..., 0], 255)[..., None], 3, axis=-1)
    elif px.mode in ("P", "PT"):
        rgb = _unit(px.palette[v], 255)
    elif px.mode in ("RGB", "RGBA"):
        rgb = _unit(v[..., :3], 255)
    elif px.mode == "CMYK":
        # Each channel (255 - ink) * (255 - black) / 255, rounded to the nearest integer (the
        # product over 255 is never exactly half-way).
        ink, black = v[..., :3].astype(np.int64), v[..., 3:].astype(np.int64)
        rgb = _unit((2 * (255 - ink) * (255 - black) + 255) // 510, 255)
    else:
        raise AssertionError(px.mode)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def expected_mask(px: Pixels) -> np.ndarray:
    """(H, W) bool: grey level at least 128 of 255 (32768 of 65535); alpha ignored."""
    v = px.values
    if px.mode == "1":
        return v.copy()
    if px.mode == "I;16":
        return v >= 32768
    if px.mode in ("P", "PT"):
        return px.palette[v][..., 0] >= 128  # grey palette
    grey = v if v.ndim == 2 else v[..., 0]  # L, or the grey of LA / grey RGB(A)
    return grey >= 128


def decoded_samples(path: Path) -> Pixels:
    """The samples PIL decodes from ``path`` (for JPEG, whose pixels are not the source's), in
    the same terms as :func:`pixels_of`; EXIF orientation not applied."""
    with Image.open(path) as image:
        image.load()
        mode = image.mode
        values = np.asarray(image)
    return Pixels(mode, values.copy())


# ----------------------------------------------------------------------------- checks


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    # A space and a non-ASCII letter: the messages must name the path as given.
    folder = tmp_path_factory.mktemp("fuzz") / "dir with spaces é"
    folder.mkdir()
    return folder


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def check_image(tensor: torch.Tensor, shape: tuple[int, int] | None = None) -> None:
    """The shape, dtype and range every image has, whatever the file held."""
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    assert tensor.dim() == 3 and tensor.shape[0] == 3 and tensor.shape[1] >= 1 and tensor.shape[2] >= 1
    assert tensor.is_contiguous()
    assert bool(torch.isfinite(tensor).all()) and float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
    if shape is not None:
        assert tuple(tensor.shape[1:]) == shape


def check_mask(tensor: torch.Tensor, shape: tuple[int, int] | None = None) -> None:
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.bool
    assert tensor.dim() == 2 and tensor.shape[0] >= 1 and tensor.shape[1] >= 1
    if shape is not None:
        assert tuple(tensor.shape) == shape


def outcome(loader, path: Path):
    """``loader(path)``, or the ValueError it raised, checked to name the file on one line. Any
    other exception propagates and fails the test."""
    try:
        return loader(path)
    except ValueError as err:
        message = str(err)
        assert str(path) in message, f"the error does not name the file: {message!r}"
        assert "\n" not in message, f"the error is not one line: {message!r}"
        assert len(message) > len(str(path)) + 10, f"the error gives no reason: {message!r}"
        if currently_in_test_context():
            note(f"{loader.__name__}: ValueError: {message}")
        return err


@contextmanager
def pixel_limit(limit: int | None):
    """PIL's decompression-bomb limit set to ``limit`` for the block (a corrupt header can claim
    any size; a low limit keeps such files from costing memory)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@pytest.fixture(autouse=True)
def _truncated_images_refused():
    """Every test here runs with PIL's default of refusing truncated files, and leaves it so."""
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    yield
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ----------------------------------------------------------------------------- round trips


@given(case=cases(formats=tuple(_LOSSLESS)))
def test_lossless_round_trip_is_exact(scratch: Path, case: Case) -> None:
    px = pixels_of(case)
    path = write(scratch, f"round{case.suffix}", encode(case, px))
    image = load_image(path)
    check_image(image, (case.height, case.width))
    np.testing.assert_array_equal(image.numpy(), expected_rgb(px))


@given(case=cases(formats=tuple(_LOSSY)))
def test_jpeg_round_trip_matches_its_decoded_samples(scratch: Path, case: Case) -> None:
    px = pixels_of(case)
    path = write(scratch, f"round{case.suffix}", encode(case, px))
    image = load_image(path)
    check_image(image, (case.height, case.width))
    decoded = decoded_samples(path)
    assert decoded.mode == px.mode
    np.testing.assert_array_equal(image.numpy(), expected_rgb(decoded))
    if case.pattern in ("zero", "full") and case.mode != "CMYK":  # flat pictures survive JPEG
        np.testing.assert_allclose(image.numpy(), expected_rgb(px), rtol=0, atol=2.5 / 255)


@given(case=cases(formats=tuple(_LOSSLESS), modes=_MASK_MODES, grey=True))
def test_mask_round_trip_is_exact(scratch: Path, case: Case) -> None:
    px = pixels_of(case)
    path = write(scratch, f"mask{case.suffix}", encode(case, px))
    mask = load_mask(path)
    check_mask(mask, (case.height, case.width))
    np.testing.assert_array_equal(mask.numpy(), expected_mask(px))


# EXIF orientation -> the upright picture of the stored (H, W, ...) pixels, written from the tag's
# definition: 2 mirrored, 3 rotated 180, 4 flipped, 5 transposed, 6 stored rotated 90 counter-
# clockwise (shown turned clockwise), 7 transverse, 8 stored rotated 90 clockwise.
_UPRIGHT = {
    1: lambda t: t,
    2: lambda t: t.flip(1),
    3: lambda t: t.flip(0, 1),
    4: lambda t: t.flip(0),
    5: lambda t: t.transpose(0, 1),
    6: lambda t: t.transpose(0, 1).flip(1),
    7: lambda t: t.flip(0, 1).transpose(0, 1),
    8: lambda t: t.transpose(0, 1).flip(0),
}

_EXIF_FORMATS = ("png", "tiff", "tiff-lzw", "jpeg") + (("webp",) if HAS_WEBP else ())


@given(
    case=cases(formats=_EXIF_FORMATS, modes=("1", "L", "P", "RGB", "RGBA", "I;16", "CMYK")),
    orientation=st.integers(1, 8),
)
def test_exif_orientation_applied(scratch: Path, case: Case, orientation: int) -> None:
    px = pixels_of(case)
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    path = write(scratch, f"oriented{case.suffix}", encode(case, px, exif=exif.tobytes()))
    with Image.open(path) as stored:
        assert stored.getexif().get(0x0112) == orientation  # PIL wrote the tag: the test tests something
    stored_px = decoded_samples(path) if case.fmt in _LOSSY else px
    upright = _UPRIGHT[orientation](torch.from_numpy(expected_rgb(stored_px)).permute(1, 2, 0)).permute(2, 0, 1)
    image = load_image(path)
    check_image(image)
    assert torch.equal(image, upright.contiguous())
    if case.mode in _MASK_MODES and case.fmt not in _LOSSY:
        mask = load_mask(path)
        assert torch.equal(mask, _UPRIGHT[orientation](torch.from_numpy(_mask_any_colour(px))))


def _mask_any_colour(px: Pixels) -> np.ndarray:
    """The mask of any stored colour, by PIL's documented luminance L = (299 R + 587 G + 114 B)
    / 1000 computed in 16-bit fixed point as PIL does (weights 19595, 38470, 7471 of 65536)."""
    if px.mode in ("1", "I;16", "L", "LA"):
        return expected_mask(px)
    rgb = (px.palette[px.values] if px.mode in ("P", "PT") else px.values[..., :3]).astype(np.int64)
    grey = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return grey >= 128


# ----------------------------------------------------------------------------- PNG written here
# PIL writes neither interlaced PNGs nor 2-bit grey: a small encoder makes them, and PNGs whose
# pixel data is cut short while every checksum still agrees.


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _scanlines(values: np.ndarray, depth: int) -> bytes:
    """Filter-0 scanlines of a (h, w, samples) array of ``depth``-bit samples."""
    rows = []
    for row in values:
        flat = row.reshape(-1).astype(np.uint64)
        if depth == 16:
            data = flat.astype(">u2").tobytes()
        elif depth == 8:
            data = flat.astype(np.uint8).tobytes()
        else:  # samples packed most significant bit first; the last byte padded with zeros
            bits = ((flat[:, None] >> np.arange(depth - 1, -1, -1, dtype=np.uint64)) & 1).astype(np.uint8)
            data = np.packbits(bits.reshape(-1)).tobytes()
        rows.append(b"\x00" + data)
    return b"".join(rows)


def png_bytes(values: np.ndarray, depth: int, colour: int, interlace: bool, keep: float = 1.0) -> bytes:
    """A PNG of ``values`` (h, w, samples); ``keep`` < 1 keeps only that share of the scanline
    bytes (cut at a scanline boundary), compressed as a complete, valid zlib stream."""
    height, width = values.shape[:2]
    if interlace:
        raw = b"".join(
            _scanlines(values[y0::dy, x0::dx], depth) for x0, y0, dx, dy in _ADAM7 if x0 < width and y0 < height
        )
    else:
        raw = _scanlines(values, depth)
    if keep < 1.0:
        row_bytes = len(_scanlines(values[:1], depth)) if not interlace else 1
        raw = raw[: int(len(raw) * keep) // row_bytes * row_bytes]
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, int(interlace))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


_GREY_DEPTHS = (1, 2, 4, 8, 16)


@st.composite
def png_specs(draw):
    """(values (h, w, samples), depth, colour type, interlace): grey at 1..16 bits, grey+alpha,
    RGB and RGBA at 8 or 16 bits."""
    colour = draw(st.sampled_from([0, 4, 2, 6]))
    depth = draw(st.sampled_from(_GREY_DEPTHS if colour == 0 else (8, 16)))
    height, width = draw(sizes)
    samples = {0: 1, 4: 2, 2: 3, 6: 4}[colour]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.integers(0, 2**depth, (height, width, samples))
    if draw(st.booleans()):
        values[-1] = 0
    return values, depth, colour, draw(st.booleans())


@given(spec=png_specs())
def test_png_any_depth_and_interlace_round_trip(scratch: Path, spec) -> None:
    values, depth, colour, interlace = spec
    path = write(scratch, "written.png", png_bytes(values, depth, colour, interlace))
    image = load_image(path)
    check_image(image, values.shape[:2])
    # Every sample over its maximum (PIL scales 1/2/4-bit grey to 0..255, which is the same
    # fraction); grey repeated, alpha dropped. 16-bit colour (grey + alpha, RGB, RGBA) has no
    # 16-bit PIL mode: it comes as its high byte.
    colours = values[..., :1].repeat(3, axis=-1) if colour in (0, 4) else values[..., :3]
    if depth == 16 and colour != 0:
        expected = _unit(colours >> 8, 255)
    else:
        expected = _unit(colours, 2**depth - 1)
    np.testing.assert_array_equal(image.numpy(), expected.transpose(2, 0, 1))
    if colour in (0, 4):
        level = values[..., 0] * 255 // (2**depth - 1) if depth < 16 else values[..., 0] >> 8
        np.testing.assert_array_equal(load_mask(path).numpy(), level >= 128)


@given(spec=png_specs(), keep=st.floats(0.0, 0.999))
def test_png_with_missing_rows_is_refused(scratch: Path, spec, keep: float) -> None:
    """Pixel data that ends early at a scanline boundary, in a complete zlib stream with good
    checksums: PIL decodes it without a word and leaves the rows it lacks black; fastad refuses."""
    values, depth, colour, interlace = spec
    path = write(scratch, "short rows.png", png_bytes(values, depth, colour, interlace, keep=keep))
    for loader in (load_image, load_mask):
        with pytest.raises(ValueError) as info:
            loader(path)
        assert str(path) in str(info.value) and ("truncated" in str(info.value) or "decode" in str(info.value))


# ----------------------------------------------------------------------------- damaged files


_DAMAGE_FORMATS = tuple(_FORMATS)


@st.composite
def encoded(draw, formats=_DAMAGE_FORMATS) -> tuple[Case, bytes]:
    case = draw(cases(formats=formats))
    return case, encode(case, pixels_of(case))


def check_cut(
    folder: Path, case: Case, whole: bytes, cut: int, complete: torch.Tensor, complete_mask: torch.Tensor
) -> None:
    """``whole`` cut to its first ``cut`` bytes: ValueError naming the file ("empty" at 0 bytes),
    or, only where what is left still holds every pixel, the same image and mask as the whole."""
    path = write(folder, f"cut{case.suffix}", whole[:cut])
    result = outcome(load_image, path)
    if cut == 0:
        assert isinstance(result, ValueError) and "empty" in str(result)
    if isinstance(result, torch.Tensor):
        assert torch.equal(result, complete), f"a file cut at {cut} of {len(whole)} bytes decoded to another image"
    mask = outcome(load_mask, path)
    assert isinstance(mask, ValueError) == isinstance(result, ValueError)
    if isinstance(mask, torch.Tensor):
        assert torch.equal(mask, complete_mask)


@pytest.mark.faults
@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns on damaged metadata (EXIF, TIFF tags)
@given(item=encoded(), data=st.data())
def test_truncated_file(scratch: Path, item, data) -> None:
    """A file cut at generated offsets (any byte, and often near the end, where the trailers are)."""
    case, whole = item
    complete = load_image(write(scratch, f"whole{case.suffix}", whole))
    complete_mask = load_mask(scratch / f"whole{case.suffix}")
    offsets = st.one_of(st.integers(0, len(whole) - 1), st.integers(max(0, len(whole) - 24), len(whole) - 1))
    for cut in data.draw(st.lists(offsets, min_size=1, max_size=8, unique=True), label="cuts"):
        check_cut(scratch, case, whole, cut, complete, complete_mask)


@pytest.mark.faults
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", sorted(_FORMATS))
def test_every_cut_of_a_small_file(tmp_path: Path, fmt: str) -> None:
    """Not generated: every cut offset of one small picture per format."""
    mode = "RGB" if "RGB" in _FORMATS[fmt][2] else "P"
    case = Case(fmt, mode, 6, 5, "noise", seed=7, palette_size=256, grey=False)
    whole = encode(case, pixels_of(case))
    complete = load_image(write(tmp_path, f"whole{case.suffix}", whole))
    complete_mask = load_mask(tmp_path / f"whole{case.suffix}")
    for cut in range(len(whole)):
        check_cut(tmp_path, case, whole, cut, complete, complete_mask)


@pytest.mark.faults
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
@given(item=encoded(), data=st.data())
def test_corrupted_bytes(scratch: Path, item, data) -> None:
    """Bytes overwritten at random places (a few damaged copies of each generated file):
    ValueError naming the file, or an image (and mask) that satisfies the contract."""
    case, whole = item
    edit = st.tuples(st.integers(0, len(whole) - 1), st.integers(0, 255))
    for edits in data.draw(st.lists(st.lists(edit, min_size=1, max_size=8), min_size=1, max_size=4), label="copies"):
        damaged = bytearray(whole)
        for where, byte in edits:
            damaged[where] = byte
        path = write(scratch, f"damaged{case.suffix}", bytes(damaged))
        with pixel_limit(1 << 20):
            image = outcome(load_image, path)
            mask = outcome(load_mask, path)
        if isinstance(image, torch.Tensor):
            check_image(image)
        if isinstance(mask, torch.Tensor):
            check_mask(mask)


_MAGIC = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    b"II*\x00",
    b"MM\x00*",
    b"II*\x00\x08\x00\x00\x00",
    b"BM",
    b"GIF89a",
    b"GIF87a",
    b"RIFF\x00\x00\x00\x00WEBPVP8L",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"P6\n",
    b"P5\n3 3\n255\n",
    b"\x00\x00\x01\x00",
    b"8BPS",
    b"qoif",
    b"DDS ",
]


@pytest.mark.faults
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
@given(
    magic=st.sampled_from(_MAGIC),
    body=st.binary(max_size=600),
    suffix=st.sampled_from([".png", ".jpg", ".tif", ".bmp", ".gif", ".webp"]),
)
def test_garbage_with_an_image_name(scratch: Path, magic: bytes, body: bytes, suffix: str) -> None:
    """Arbitrary bytes, often behind a real format's signature, under an image file name."""
    path = write(scratch, f"garbage{suffix}", magic + body)
    with pixel_limit(1 << 20):
        image = outcome(load_image, path)
        mask = outcome(load_mask, path)
    if not magic + body:
        assert isinstance(image, ValueError) and "empty" in str(image)
    if isinstance(image, torch.Tensor):
        check_image(image)
    if isinstance(mask, torch.Tensor):
        check_mask(mask)


@pytest.mark.faults
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
@given(
    width=st.integers(0, 2**31 - 1),
    height=st.integers(0, 2**31 - 1),
    depth=st.sampled_from([0, 1, 2, 4, 8, 16, 3, 255]),
    colour=st.sampled_from([0, 2, 3, 4, 6, 1, 7]),
    interlace=st.integers(0, 2),
    idat=st.binary(max_size=200),
    valid_stream=st.booleans(),
)
def test_png_header_claims_anything(
    scratch: Path, width: int, height: int, depth: int, colour: int, interlace: int, idat: bytes, valid_stream: bool
) -> None:
    """A PNG with good checksums whose header claims any size, depth, colour type and interlace
    over pixel data that does not match: ValueError naming the file, or a correct decode."""
    body = zlib.compress(idat) if valid_stream else idat
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")
    path = write(scratch, "claims.png", data)
    with pixel_limit(1 << 20):
        image = outcome(load_image, path)
    if isinstance(image, torch.Tensor):  # only a header that matches its pixel data decodes
        check_image(image, (height, width))


# ----------------------------------------------------------------------------- fixed edge cases


@pytest.mark.parametrize("shape", [(1, 65535), (65535, 1)], ids=["1x65535", "65535x1"])
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_longest_strips(tmp_path: Path, shape: tuple[int, int], suffix: str) -> None:
    values = np.random.default_rng(0).integers(0, 65536, shape).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / f"strip{suffix}")
    image = load_image(tmp_path / f"strip{suffix}")
    check_image(image, shape)
    np.testing.assert_array_equal(image[0].numpy(), _unit(values, 65535))
    np.testing.assert_array_equal(load_mask(tmp_path / f"strip{suffix}").numpy(), values >= 32768)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    # Smooth inks, so that JPEG loss stays small next to the difference inverted inks would make.
    yy, xx = np.mgrid[0:40, 0:56].astype(np.float64)
    cmyk = (
        np.stack([xx / 55 * 200, yy / 39 * 200, (xx + yy) / 94 * 120, np.full_like(xx, 40)], axis=-1)
        .round()
        .astype(np.uint8)
    )
    Image.frombytes("CMYK", (56, 40), cmyk.tobytes()).save(tmp_path / "cmyk.jpg", quality=95)
    decoded = decoded_samples(tmp_path / "cmyk.jpg")
    assert decoded.mode == "CMYK"  # stored as CMYK (Adobe), not converted on save
    image = load_image(tmp_path / "cmyk.jpg")
    np.testing.assert_array_equal(image.numpy(), expected_rgb(decoded))
    assert np.abs(image.numpy() - expected_rgb(Pixels("CMYK", cmyk))).mean() < 0.01


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` grey pixels and holds one compressed row."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("loader", [load_image, load_mask])
def test_larger_than_the_pixel_limit(tmp_path: Path, loader) -> None:
    """Above PIL.Image.MAX_IMAGE_PIXELS: a ValueError that names the file, says it is larger than
    the limit and how to allow it. PIL refuses above twice the limit (DecompressionBombError)
    and only warns in between; fastad refuses both, before decoding a pixel."""
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None  # PIL's default, about 89 megapixels
    far = write(tmp_path, "far.png", _png_header_only(3 * limit // 1000, 1000))  # PIL: error
    near = write(tmp_path, "near.png", _png_header_only(limit // 1000 + 1, 1000))  # PIL: warning
    for path, pil_says in ((far, None), (near, Image.DecompressionBombWarning)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ValueError) as info:
                loader(path)
        message = str(info.value)
        assert str(path) in message and "larger than" in message and "MAX_IMAGE_PIXELS" in message, message
        assert f"{limit}" in message and "None" in message, message  # the limit, and how to lift it
        # PIL's own warning is not hidden (that would mean changing the global warning filters).
        assert [w.category for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == (
            [pil_says] if pil_says else []
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warnings as errors: the same ValueError, not the warning
        with pytest.raises(ValueError, match="larger than"):
            loader(near)


def test_pixel_limit_is_the_one_threshold(tmp_path: Path) -> None:
    """With the limit lowered: at the limit loads, one pixel over (PIL would only warn) and far
    over (PIL would refuse) are the same ValueError; no limit (None) loads anything."""
    values = np.arange(100, dtype=np.uint8).reshape(10, 10)
    for name, shape in (("at.png", (10, 10)), ("over.png", (10, 11)), ("far.png", (30, 10))):
        Image.fromarray(np.resize(values, shape)).save(tmp_path / name)
    with pixel_limit(100), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        check_image(load_image(tmp_path / "at.png"), (10, 10))
        for name in ("over.png", "far.png"):
            with pytest.raises(ValueError, match=rf"{name}.*larger than.*limit 100 pixels"):
                load_image(tmp_path / name)
            with pytest.raises(ValueError, match=rf"{name}.*larger than"):
                load_mask(tmp_path / name)
    with pixel_limit(None):
        check_image(load_image(tmp_path / "far.png"), (30, 10))


def test_mask_folder_and_empty_file(tmp_path: Path) -> None:
    (tmp_path / "folder_mask.png").mkdir()
    with pytest.raises(ValueError, match=r"folder_mask\.png"):
        load_mask(tmp_path / "folder_mask.png")
    (tmp_path / "empty_mask.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"mask file is empty.*empty_mask\.png"):
        load_mask(tmp_path / "empty_mask.png")


def _frames(count: int, size=(9, 7)) -> list[Image.Image]:
    rng = np.random.default_rng(count)
    frames = []
    for _ in range(count):
        image = Image.frombytes("P", size, rng.integers(0, 256, size[::-1], dtype=np.uint8).tobytes())
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        frames.append(image)
    return frames


@pytest.mark.parametrize("suffix", [".tif", ".gif", ".png"])
def test_multi_frame_file_gives_its_first_frame(tmp_path: Path, suffix: str) -> None:
    frames = _frames(3)
    path = tmp_path / f"frames{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3
    first = Pixels("P", np.asarray(frames[0]), np.asarray(frames[0].getpalette(), dtype=np.uint8).reshape(-1, 3))
    np.testing.assert_array_equal(load_image(path).numpy(), expected_rgb(first))


def test_truncated_images_when_the_caller_allows_them(tmp_path: Path, monkeypatch) -> None:
    """ImageFile.LOAD_TRUNCATED_IMAGES is the caller's process-wide choice and is respected: with
    it set, PIL fills what a truncated file lacks and the image loads (documented in
    images.py); without it (the default, asserted around every test here) the cut file is an
    error."""
    values = np.random.default_rng(1).integers(1, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"cut\.png.*truncated"):
        load_image(tmp_path / "cut.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    image = load_image(tmp_path / "cut.png")
    check_image(image, (32, 32))
    assert not torch.equal(image, load_image(tmp_path / "whole.png"))
    monkeypatch.undo()

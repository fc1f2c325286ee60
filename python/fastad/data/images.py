"""Reading image and mask files into tensors.

Every image, whatever its storage (8- or 16-bit grey, palette, RGBA, CMYK, EXIF-rotated JPEG),
comes out as the same thing: float32 RGB in [0, 1], shape (3, H, W), upright as a viewer shows it.
Every mask comes out as a bool (H, W) tensor. A missing file raises FileNotFoundError; every
other bad file (empty, truncated, corrupt, not an image, too many pixels) a ValueError that
names the file and says why.
"""

from __future__ import annotations

import io
import os
import re
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

__all__ = ["decode_rgb8", "load_image", "load_mask", "MASK_THRESHOLD"]

# Mask pixels at or above this 8-bit grey level are defect pixels. Half-way, because the
# magnetic-tile masks have a few low-valued pixels along the defect edges (JPEG-like ringing
# around 0/255 masks) that are not part of the defect.
MASK_THRESHOLD = 128

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_EXIF_ORIENTATION = 0x0112  # the EXIF tag of the orientation


def _reason(err: BaseException) -> str:
    """The reason an exception gives, on one line (some PIL messages are empty or span lines)."""
    if isinstance(err, MemoryError):
        return "out of memory while decoding"
    return " ".join(str(err).split()) or type(err).__name__


def _too_large(what: str, path: Path, size: str) -> ValueError:
    limit = Image.MAX_IMAGE_PIXELS
    return ValueError(
        f"{what} {path} is larger than the image size limit: {size}, limit {limit} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS, its guard against decompression bombs); if the file is trusted, "
        "raise the limit before loading it (PIL.Image.MAX_IMAGE_PIXELS = <pixels>, or None for no limit)"
    )


def _bomb_error(what: str, path: Path, err: Exception) -> ValueError:
    """PIL's DecompressionBombError/Warning as fastad's error: PIL's message gives the pixel count
    and *its* threshold (twice the limit, for the error); only the count is worth repeating."""
    count = re.search(r"\((\d+) pixels\)", str(err))
    return _too_large(what, path, f"{count[1]} pixels" if count else _reason(err))


def _open_decoded(path: str | os.PathLike, what: str = "image file") -> tuple[Path, Image.Image]:
    """Open ``path``, decode every pixel, apply the EXIF orientation.

    Raises FileNotFoundError when there is no such file, ValueError (naming the file and the
    reason) when it is a folder, empty, truncated, not an image PIL can read, or has more pixels
    than ``PIL.Image.MAX_IMAGE_PIXELS``. Nothing else: whatever PIL raises while parsing or
    decoding (OSError, SyntaxError, EOFError, struct.error, IndexError, MemoryError...) becomes
    that ValueError.

    The size limit: PIL itself warns (DecompressionBombWarning) between MAX_IMAGE_PIXELS and twice
    that, and refuses only above; here there is one threshold, MAX_IMAGE_PIXELS, checked before
    any pixel is decoded, so that a file whose header claims a huge size costs no memory. PIL's
    warning is left as it is (silencing it would mean changing the process-wide warning filters,
    which is not thread-safe); when warnings are errors, it becomes the same ValueError.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise ValueError(f"expected an image file, got a directory or special file: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} is empty (0 bytes): {path}")
    # Opened here rather than by PIL so that permission errors surface as themselves, not as
    # "cannot decode".
    with open(path, "rb") as handle:
        try:
            image = Image.open(handle)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _bomb_error(what, path, err) from err
        except Image.UnidentifiedImageError as err:
            raise ValueError(f"cannot decode {what} {path}: not an image, or in a format PIL cannot read") from err
        except Exception as err:  # PIL raises OSError, SyntaxError, EOFError, struct.error...
            raise ValueError(f"cannot decode {what} {path}: {_reason(err)}") from err
        width, height = image.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and width * height > limit:
            raise _too_large(what, path, f"{width} x {height} = {width * height} pixels")
        try:
            # Image.open reads only the header; load() decodes all pixels, which is where a
            # truncated or corrupt file shows. ImageFile.LOAD_TRUNCATED_IMAGES is respected: it
            # is the caller's process-wide choice (False by default), and when it is True PIL
            # fills what a truncated file lacks instead of raising, and so does this function.
            image.load()
        except Exception as err:
            raise ValueError(f"cannot decode {what} {path}: {_reason(err)}") from err
    _check_png_complete(image, path, what)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as err:  # a malformed EXIF block
        raise ValueError(f"cannot apply the EXIF orientation of {what} {path}: {_reason(err)}") from err
    return path, image


# PNG colour type -> samples per pixel; Adam7 passes as (x0, y0, dx, dy).
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _check_png_complete(image: Image.Image, path: Path, what: str) -> None:
    """ValueError when a PNG's compressed pixel data ends before its last row.

    PIL's PNG decoder stops without an error when the zlib stream ends at a row boundary before
    the height the header gives, and leaves the rows it did not get black (an intact zlib stream
    that is too short: a faulty writer, or a damaged file whose checksums still agree). Rows are
    decoded top to bottom into a zeroed buffer, so a last row with any non-zero byte proves a
    non-interlaced image complete at no cost; otherwise (and for interlaced images) the pixel
    data is inflated once more, without keeping it, and its size compared with the header's.
    """
    if image.format != "PNG" or ImageFile.LOAD_TRUNCATED_IMAGES:  # the caller accepts missing pixels
        return
    width, height = image.size
    if not image.info.get("interlace"):
        last_row = image.crop((0, height - 1, width, height)).tobytes()
        if last_row.count(0) != len(last_row):
            return
    shortfall = _png_pixel_shortfall(path)
    if shortfall is not None:
        found, needed = shortfall
        raise ValueError(
            f"cannot decode {what} {path}: truncated PNG pixel data (it holds {found} of the {needed} "
            f"bytes that its {width} x {height} header needs; the missing rows would come out black)"
        )


def _png_pixel_shortfall(path: Path) -> tuple[int, int] | None:
    """(bytes the pixel data inflates to, bytes the IHDR needs) when the first is smaller, else
    None. The pixel data is read as PIL reads it, the IDAT chunks up to the first other chunk,
    and counted, not kept."""
    data = path.read_bytes()
    pos, header, found, inflater, in_idat = 8, None, 0, zlib.decompressobj(), False
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind == b"IHDR":
            header = data[pos + 8 : pos + 21]
        elif kind == b"IDAT":
            in_idat = True
            chunk = data[pos + 8 : pos + 8 + length]
            try:
                while chunk and not inflater.eof:
                    found += len(inflater.decompress(chunk, 1 << 20))
                    chunk = inflater.unconsumed_tail
            except zlib.error:
                # PIL decoded this stream without an error, so the damage lies past the last row
                # (PIL stops reading there): every row is present.
                return None
        elif in_idat or kind == b"IEND":
            break
        pos += 12 + length
    if header is None or len(header) < 13:
        return None
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    bits = depth * _PNG_SAMPLES.get(colour, 0)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    needed = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-max(width - x0, 0) // dx), -(-max(height - y0, 0) // dy)
        if columns and rows:
            needed += rows * (1 + (columns * bits + 7) // 8)  # a filter byte starts every row
    return (found, needed) if found < needed else None


def _sixteen_bit_values(image: Image.Image, path: Path) -> np.ndarray:
    """(H, W) uint16 from a 16-bit grey image ("I;16*", or "I" holding values in 0..65535)."""
    values = np.asarray(image)
    if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(
            f"file {path} is 32-bit integer (mode 'I') with values in "
            f"[{values.min()}, {values.max()}]; only 16-bit data (0..65535) is supported"
        )
    return values.astype(np.uint16)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as float32 RGB in [0, 1], shape (3, H, W), EXIF orientation applied.

    Supported storage: 1-bit, 8-bit grey (L), 16-bit grey (I;16, or I with values in 0..65535;
    divided by 65535 so all 16 bits are kept), RGB, RGBA, LA, palette (P, PA, with or without
    transparency), CMYK (PIL's plain conversion, no colour profile) and YCbCr. Grey images are
    repeated over the three channels. 16-bit colour (RGB, RGBA, grey + alpha) has no 16-bit PIL
    mode and comes as its high byte. Only the first frame of a multi-frame file is read.

    Alpha is dropped, not composited: the stored colour of every pixel is kept as it is. A
    defect detector looks at surface colours, and compositing over an arbitrary background
    would invent colours that the object does not have.

    Raises FileNotFoundError when the file does not exist; ValueError naming the file and the
    reason for every other failure: a folder, an empty, truncated or corrupt file, not an image,
    more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (raise or clear that limit to read larger
    trusted files), or an unsupported kind (float "F" images, whose range is unknown; 32-bit
    integer images beyond 16-bit values).
    """
    path, image = _open_decoded(path)
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = _sixteen_bit_values(image, path).astype(np.float32) / np.float32(65535)
        return torch.from_numpy(gray).unsqueeze(0).expand(3, -1, -1).contiguous()
    if image.mode == "F":
        raise ValueError(
            f"image file {path} is 32-bit float (mode 'F'), whose value range is unknown; "
            "convert it to 8- or 16-bit first"
        )
    image = _convert(image, "RGB", f"image file {path}")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3) uint8
    return pixels.permute(2, 0, 1).to(torch.float32).div_(255.0).contiguous()


def decode_rgb8(data: bytes, what: str) -> np.ndarray:
    """(H, W, 3) uint8 from encoded image bytes (an image inside an archive), EXIF orientation
    applied; 16-bit grey is rounded to 8 bits, alpha dropped as :func:`load_image` does. ValueError
    naming ``what`` when the bytes are not a readable image."""
    if not data:
        raise ValueError(f"image {what} is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes every pixel: where a truncated or corrupt file shows
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _bomb_error("image", Path(what), err) from err
    except Exception as err:  # PIL raises OSError, SyntaxError, EOFError, struct.error...
        raise ValueError(f"cannot decode image {what}: {_reason(err)}") from err
    # getexif() is cheap; exif_transpose is not, and almost no image needs it.
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.rint(_sixteen_bit_values(image, Path(what)) / np.float32(257.0)).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise ValueError(f"image {what} is 32-bit float (mode 'F'), whose value range is unknown")
    return np.asarray(_convert(image, "RGB", f"image {what}"), dtype=np.uint8)


def _convert(image, mode: str, what: str):
    """``image`` in PIL mode ``mode`` ("RGB" or "L"), its alpha dropped. Alpha modes and palettes
    with transparency go through RGBA first, which applies the palette's transparency the way PIL
    intends (and avoids its warning); ValueError naming ``what`` when PIL cannot convert."""
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == mode:
        return image
    try:
        return image.convert(mode)
    except ValueError as err:
        raise ValueError(
            f"cannot convert {what} (mode {image.mode!r}) to {'RGB' if mode == 'RGB' else 'grey'}: {err}"
        ) from err


def load_mask(path: str | os.PathLike) -> torch.Tensor:
    """Read a mask file as a bool (H, W) tensor: True where the pixel is at least 128 of 255.

    Any storage is first brought to 8-bit grey: colour by PIL's luminance, palette through its
    colours, 1-bit as 0/255, 16-bit by keeping the high byte (so True from 32768 of 65535);
    alpha is ignored. The EXIF orientation is applied, as for images.

    Raises FileNotFoundError when the file does not exist; ValueError naming the file and the
    reason for every other failure, as :func:`load_image` does.
    """
    path, image = _open_decoded(path, "mask file")
    if image.mode in _SIXTEEN_BIT_MODES:
        high_byte = _sixteen_bit_values(image, path) >> 8
        return torch.from_numpy(high_byte >= MASK_THRESHOLD)
    if image.mode == "F":
        raise ValueError(f"mask file {path} is 32-bit float (mode 'F'); expected 8- or 16-bit")
    image = _convert(image, "L", f"mask file {path}")
    gray = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(gray >= MASK_THRESHOLD)

"""Reading image and mask files into tensors.

Every image, whatever its storage (8- or 16-bit grey, palette, RGBA, CMYK, EXIF-rotated JPEG),
comes out as the same thing: float32 RGB in [0, 1], shape (3, H, W), upright as a viewer shows it.
Every mask comes out as a bool (H, W) tensor. Bad files raise an error that names the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["load_image", "load_mask", "MASK_THRESHOLD"]

# Mask pixels at or above this 8-bit grey level are defect pixels. Half-way, because the
# magnetic-tile masks have a few low-valued pixels along the defect edges (JPEG-like ringing
# around 0/255 masks) that are not part of the defect.
MASK_THRESHOLD = 128

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _open_decoded(path: str | os.PathLike) -> tuple[Path, Image.Image]:
    """Open ``path``, decode every pixel, apply the EXIF orientation.

    Raises FileNotFoundError when there is no such file, ValueError (naming the file and the
    reason) when it is a folder, empty, truncated or not an image PIL can read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not path.is_file():
        raise ValueError(f"expected an image file, got a directory or special file: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"image file is empty (0 bytes): {path}")
    # Opened here rather than by PIL so that permission errors surface as themselves, not as
    # "cannot decode".
    with open(path, "rb") as handle:
        try:
            image = Image.open(handle)
            # Image.open reads only the header; load() decodes all pixels, which is where a
            # truncated or corrupt file shows (unless someone set ImageFile.LOAD_TRUNCATED_IMAGES).
            image.load()
        except Image.DecompressionBombError:
            raise
        except Exception as err:  # PIL raises OSError, SyntaxError, EOFError, struct.error...
            raise ValueError(f"cannot decode image file {path}: {err}") from err
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as err:  # a malformed EXIF block
        raise ValueError(f"cannot apply the EXIF orientation of image file {path}: {err}") from err
    return path, image


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
    repeated over the three channels. Only the first frame of a multi-frame file is read.

    Alpha is dropped, not composited: the stored colour of every pixel is kept as it is. A
    defect detector looks at surface colours, and compositing over an arbitrary background
    would invent colours that the object does not have.

    Raises FileNotFoundError when the file does not exist; ValueError naming the file when it
    is empty, truncated, not an image, or of an unsupported kind (float "F" images, whose range
    is unknown; 32-bit integer images beyond 16-bit values).
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
        raise ValueError(f"cannot convert {what} (mode {image.mode!r}) to {'RGB' if mode == 'RGB' else 'grey'}: {err}") from err


def load_mask(path: str | os.PathLike) -> torch.Tensor:
    """Read a mask file as a bool (H, W) tensor: True where the pixel is at least 128 of 255.

    Any storage is first brought to 8-bit grey: colour by PIL's luminance, palette through its
    colours, 1-bit as 0/255, 16-bit by keeping the high byte (so True from 32768 of 65535);
    alpha is ignored. The EXIF orientation is applied, as for images.

    Raises FileNotFoundError when the file does not exist; ValueError naming the file when it
    is empty, truncated or not an image.
    """
    path, image = _open_decoded(path)
    if image.mode in _SIXTEEN_BIT_MODES:
        high_byte = _sixteen_bit_values(image, path) >> 8
        return torch.from_numpy(high_byte >= MASK_THRESHOLD)
    if image.mode == "F":
        raise ValueError(f"mask file {path} is 32-bit float (mode 'F'); expected 8- or 16-bit")
    image = _convert(image, "L", f"mask file {path}")
    gray = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(gray >= MASK_THRESHOLD)

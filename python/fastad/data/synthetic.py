"""A synthetic anomaly-detection data set that needs no download.

Normal images are random crops (with flips, a texture tint and a small colour jitter) of the
texture photos that ship inside scikit-image (``skimage.data.brick``, ``grass``, ``gravel``).
Defects are painted onto normal images with exact masks:

    scratch   thin curved line, brighter or darker than the surface
    blob      smooth irregular spot, darker or brighter, the texture still showing through
    color     irregular patch whose hue is shifted, the brightness kept
    missing   irregular region replaced by a flat fill (the texture is gone)

Sizes and strengths are drawn from ranges that include subtle cases, so that a good detector
scores high but not perfectly. :func:`make_synthetic_dataset` writes an MVTec-layout category
that :class:`fastad.data.MVTecDataset` reads; it is what ``make demo`` runs on.

scikit-image and scipy are imported inside the functions that use them, so importing this module
stays cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..checks import check_int

__all__ = ["DEFECT_KINDS", "TEXTURES", "add_defect", "normal_image", "make_synthetic_dataset"]

DEFECT_KINDS = ("scratch", "blob", "color", "missing")

# Stationary textures bundled with scikit-image (no pooch download), all 512x512 grey. The other
# bundled photos (moon, immunohistochemistry, hubble_deep_field...) are scenes rather than
# textures: their normal content varies too much across crops to make a fair data set.
# Each texture gets an RGB tint so that images are in colour and the "color" defect is a hue
# shift, not the first colour in a grey world.
_TEXTURE_TINTS: dict[str, tuple[float, float, float]] = {
    "brick": (1.10, 0.93, 0.84),
    "grass": (0.86, 1.04, 0.72),
    "gravel": (1.02, 0.99, 0.93),
}
TEXTURES = tuple(_TEXTURE_TINTS)

_MANIFEST = "synthetic.json"
_FORMAT_VERSION = 1  # bump when the generated pixels change, so old folders are not reused
_MIN_SIDE = 16  # smallest image add_defect paints on
_ALPHA_CUTOFF = 0.15  # blend weights below this are set to 0, so the mask has no faint fringe


def _load_texture(name: str) -> np.ndarray:
    """(512, 512) uint8 grey texture photo from scikit-image's bundled files."""
    import skimage.data

    texture = getattr(skimage.data, name)()
    if texture.ndim != 2 or texture.dtype != np.uint8:  # guards against a future skimage change
        raise RuntimeError(f"skimage.data.{name}() is no longer a grey uint8 image: {texture.shape} {texture.dtype}")
    return texture


def normal_image(
    texture: np.ndarray, tint: tuple[float, float, float], size: int, rng: np.random.Generator
) -> np.ndarray:
    """A (size, size, 3) uint8 normal image: a random square crop of the grey ``texture``, flipped
    at random, resized (antialiased) to ``size`` and coloured by ``tint`` with a small jitter of
    overall brightness (+-8 %) and of each channel (+-3 %)."""
    short = min(texture.shape)
    side = int(rng.uniform(0.45, 0.65) * short)
    top = int(rng.integers(0, texture.shape[0] - side + 1))
    left = int(rng.integers(0, texture.shape[1] - side + 1))
    patch = texture[top : top + side, left : left + side]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1, :]
    resized = Image.fromarray(np.ascontiguousarray(patch)).resize((size, size), Image.Resampling.BILINEAR)
    gains = np.asarray(tint) * rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, size=3)
    rgb = np.asarray(resized, dtype=np.float64)[:, :, None] * gains
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- defect shapes


def _star_alpha(
    shape: tuple[int, int], rng: np.random.Generator, radius: float, roughness: float, edge: float
) -> np.ndarray:
    """(H, W) float blend weights in [0, 1] of a smooth irregular region.

    A star-convex outline: the radius varies with the angle by a few random harmonics (each of
    relative amplitude up to ``roughness / k``), the shape is stretched and rotated at random,
    and the border ramps from 1 to 0 over ``edge`` pixels (a hard border when ``edge`` is 0).
    The centre is drawn so that the region lies mostly inside the image.
    """
    height, width = shape
    harmonics = np.arange(1, 6)
    amplitudes = rng.uniform(0.0, roughness, size=harmonics.size) / harmonics
    phases = rng.uniform(0.0, 2 * np.pi, size=harmonics.size)
    aspect = rng.uniform(0.55, 1.0)
    rotation = rng.uniform(0.0, np.pi)
    margin = min(radius, height / 2, width / 2)
    cy = rng.uniform(margin, height - margin)
    cx = rng.uniform(margin, width - margin)

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    # Rotate, then squeeze one axis: an elongated region at a random angle.
    u = dx * np.cos(rotation) + dy * np.sin(rotation)
    v = (-dx * np.sin(rotation) + dy * np.cos(rotation)) / aspect
    distance = np.hypot(u, v)
    angle = np.arctan2(v, u)
    wobble = amplitudes[:, None, None] * np.cos(harmonics[:, None, None] * angle + phases[:, None, None])
    outline = radius * (1.0 + wobble.sum(axis=0))
    if edge <= 0:
        return (distance <= outline).astype(np.float64)
    return np.clip((outline - distance) / edge + 0.5, 0.0, 1.0)


def _scratch_alpha(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W) float blend weights of a thin curved line with an antialiased border."""
    from scipy import ndimage

    height, width = shape
    side = min(height, width)
    length = rng.uniform(0.25, 0.6) * side
    half_width = max(0.5, rng.uniform(0.006, 0.014) * side / 2)
    # Heading = start + a steady bend + a wiggle: a smooth curve, never a random walk.
    t = np.linspace(0.0, 1.0, max(2, int(length * 2)))
    heading = (
        rng.uniform(0, 2 * np.pi)
        + rng.uniform(-1.5, 1.5) * t
        + rng.uniform(-0.5, 0.5) * np.sin(rng.uniform(1.0, 3.0) * np.pi * t + rng.uniform(0, 2 * np.pi))
    )
    step = length / (t.size - 1)
    ys = np.concatenate([[0.0], np.cumsum(np.sin(heading[1:]) * step)])
    xs = np.concatenate([[0.0], np.cumsum(np.cos(heading[1:]) * step)])
    centre_y = rng.uniform(0.2, 0.8) * height
    centre_x = rng.uniform(0.2, 0.8) * width
    rows = np.rint(ys - ys.mean() + centre_y).astype(np.int64)
    cols = np.rint(xs - xs.mean() + centre_x).astype(np.int64)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    spine = np.zeros(shape, dtype=bool)
    spine[rows[inside], cols[inside]] = True
    distance = ndimage.distance_transform_edt(~spine)
    return np.clip(half_width + 0.5 - distance, 0.0, 1.0)


# ----------------------------------------------------------------------------- defects


def _paint(image: np.ndarray, alpha: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``target`` over ``image`` with weights ``alpha`` and return (defective, mask).

    Weights under the cutoff are dropped, so the mask is where the defect is visible. Only mask
    pixels are written; a mask pixel whose blend rounds back to its original colour is moved
    by one grey level, so that the mask is exactly the set of changed pixels.
    """
    region = alpha >= _ALPHA_CUTOFF
    if not region.any():  # cannot happen with the ranges above; a guard for future edits
        raise RuntimeError("the defect covers no pixel")
    weight = alpha[region][:, None]
    original = image[region].astype(np.float64)
    blended = np.clip(np.rint(original * (1 - weight) + target[region] * weight), 0, 255).astype(np.uint8)
    unchanged = np.all(blended == image[region], axis=1)
    blended[unchanged] ^= 1
    defective = image.copy()
    defective[region] = blended
    return defective, region


def _scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    alpha = _scratch_alpha(image.shape[:2], rng) * rng.uniform(0.55, 0.9)
    level = rng.uniform(200, 245) if rng.random() < 0.5 else rng.uniform(15, 50)
    return _paint(image, alpha, np.full(image.shape, level))


def _blob(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    side = min(image.shape[:2])
    radius = max(2.0, rng.uniform(0.04, 0.1) * side)
    alpha = _star_alpha(image.shape[:2], rng, radius, roughness=0.35, edge=0.5 * radius)
    strength = rng.uniform(0.35, 0.7)
    level = 0.0 if rng.random() < 0.5 else 255.0  # darker or brighter, texture kept underneath
    return _paint(image, alpha * strength, np.full(image.shape, level))


def _color(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    side = min(image.shape[:2])
    radius = max(2.0, rng.uniform(0.04, 0.09) * side)
    alpha = _star_alpha(image.shape[:2], rng, radius, roughness=0.3, edge=1.5)
    # A shift orthogonal to grey (1, 1, 1) changes the hue and keeps the brightness.
    direction = rng.normal(size=3)
    direction -= direction.mean()
    direction /= np.linalg.norm(direction)
    shift = direction * rng.uniform(30, 60)
    return _paint(image, alpha, image.astype(np.float64) + shift)


def _missing(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    side = min(image.shape[:2])
    radius = max(2.0, rng.uniform(0.04, 0.09) * side)
    alpha = _star_alpha(image.shape[:2], rng, radius, roughness=0.5, edge=0.0)
    # The backing shows through: a flat colour, the image's mean darkened by up to half.
    fill = image.reshape(-1, 3).mean(axis=0) * rng.uniform(0.5, 1.0)
    return _paint(image, alpha, np.broadcast_to(fill, image.shape))


_PAINTERS = {"scratch": _scratch, "blob": _blob, "color": _color, "missing": _missing}


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` (one of :data:`DEFECT_KINDS`) on a copy of ``image``.

    Args:
        image: (H, W, 3) uint8 RGB, H and W at least 16; not modified.
        kind: "scratch", "blob", "color" or "missing".
        rng: the numpy Generator that draws the defect's position, shape and strength.

    Returns:
        (defective, mask): the (H, W, 3) uint8 image and the (H, W) bool mask of exactly the
        pixels that differ from ``image`` (every mask pixel differs in at least one channel,
        every other pixel is identical).
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        given = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a uint8 (H, W, 3) numpy array, got {given}")
    if min(image.shape[:2]) < _MIN_SIDE:
        raise ValueError(
            f"image must be at least {_MIN_SIDE}x{_MIN_SIDE} pixels, got {image.shape[0]}x{image.shape[1]}"
        )
    if kind not in _PAINTERS:
        raise ValueError(f"kind must be one of {DEFECT_KINDS}, got {kind!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    return _PAINTERS[kind](image, rng)


# ----------------------------------------------------------------------------- the data set


def _save_png(array: np.ndarray, path: Path) -> None:
    # Fixed compression settings and no metadata: the same pixels give the same bytes.
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def _write_category(folder: Path, settings: dict, rng_for: Callable[[int, int], np.random.Generator]) -> None:
    """Write every file of the category into ``folder`` (which exists and is empty)."""
    texture = _load_texture(settings["texture"])
    tint = _TEXTURE_TINTS[settings["texture"]]
    size = settings["size"]

    def save_normals(subfolder: Path, count: int, stream: int) -> None:
        subfolder.mkdir(parents=True)
        for index in range(count):
            _save_png(normal_image(texture, tint, size, rng_for(stream, index)), subfolder / f"{index:03d}.png")

    save_normals(folder / "train" / "good", settings["n_train"], 0)
    save_normals(folder / "test" / "good", settings["n_test_good"], 1)
    for kind_number, kind in enumerate(DEFECT_KINDS, start=2):
        images, masks = folder / "test" / kind, folder / "ground_truth" / kind
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for index in range(settings["n_test_per_defect"]):
            rng = rng_for(kind_number, index)
            defective, mask = add_defect(normal_image(texture, tint, size, rng), kind, rng)
            _save_png(defective, images / f"{index:03d}.png")
            _save_png(mask.astype(np.uint8) * 255, masks / f"{index:03d}_mask.png")
    (folder / _MANIFEST).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def make_synthetic_dataset(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    texture: str = "grass",
    size: int = 256,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_per_defect: int = 5,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic MVTec-layout category at ``root`` and return its path.

    Layout: ``train/good/NNN.png`` (n_train), ``test/good/NNN.png`` (n_test_good),
    ``test/<kind>/NNN.png`` and ``ground_truth/<kind>/NNN_mask.png`` (0/255 grey PNG) for each of
    :data:`DEFECT_KINDS` (n_test_per_defect each), all ``size`` x ``size`` RGB, plus
    ``synthetic.json`` recording the settings.

    The result is byte-for-byte the same for the same arguments: every image draws from its own
    generator seeded by (seed, folder, index), so changing one count leaves the other images as
    they were. The folder is written under a temporary name beside ``root`` and renamed into
    place at the end, so ``root`` is never half-written.

    If ``root`` already holds a data set made with the same settings it is returned untouched;
    any other existing ``root`` raises FileExistsError unless ``overwrite`` is True.
    Raises ValueError for an unknown texture or counts/sizes out of range.
    """
    if texture not in _TEXTURE_TINTS:
        raise ValueError(f"texture must be one of {TEXTURES}, got {texture!r}")
    settings = {
        "format": _FORMAT_VERSION,
        "seed": check_int(seed, "seed", minimum=0),
        "texture": texture,
        "size": check_int(size, "size", minimum=32),
        "n_train": check_int(n_train, "n_train", minimum=1),
        "n_test_good": check_int(n_test_good, "n_test_good", minimum=1),
        "n_test_per_defect": check_int(n_test_per_defect, "n_test_per_defect", minimum=1),
    }
    root = Path(root)
    if root.exists() and not overwrite:
        try:
            existing = json.loads((root / _MANIFEST).read_text())
        except (OSError, ValueError):
            existing = None
        if existing == settings:
            return root
        raise FileExistsError(
            f"{root} already exists and is not a synthetic data set made with these settings; "
            "choose another path or pass overwrite=True"
        )

    def rng_for(stream: int, index: int) -> np.random.Generator:
        return np.random.default_rng([settings["seed"], stream, index])

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_category(staging, settings, rng_for)
        os.chmod(staging, 0o755)  # mkdtemp makes it 0o700
        if root.exists():  # overwrite: move the old one aside first, so root is always whole
            retired = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, retired / root.name)
            os.replace(staging, root)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root

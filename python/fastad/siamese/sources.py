"""Labelled image collections held in memory: an ImageFolder tree (folder or zip) and MNIST idx files.

The Siamese network trains on pairs drawn from small images that all fit in memory (CIFAR-10:
50,000 RGB images of 32 x 32, 150 MB as uint8), so the collection is kept as one uint8 tensor
and floats are made per batch, never for the whole set.

ImageFolder layout, in a folder or a zip archive (read member by member, never extracted)::

    <split>/<class>/<file>      e.g. train/cat/0001.jpg, test/dog/0042.png
    <class>/<file>              the same without a split level (``split=None``)

MNIST: the original idx files (``train-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` ...),
gzipped or not, in a folder or in torchvision's ``<root>/MNIST/raw``; read without torchvision.
"""

from __future__ import annotations

import contextlib
import gzip
import mmap
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._progress import progress_bar
from ..checks import check_int
from ..data.datasets import IMAGE_EXTENSIONS
from ..data.images import decode_rgb8

__all__ = ["LabelledImages", "load_image_folder", "load_mnist", "stratified_subset"]

_MNIST_CLASSES = tuple(str(digit) for digit in range(10))
_MNIST_PREFIXES = {"train": "train", "test": "t10k"}
_PROGRESS_STEP = 1024  # update the bar in chunks: tqdm costs more per call than decoding a 32x32 JPEG


@dataclass(frozen=True)
class LabelledImages:
    """Images with class labels, all of one size.

    images:  uint8 (N, C, H, W), C = 1 (grey) or 3 (RGB)
    labels:  int64 (N,), each an index into ``classes``
    classes: the class names, in label order
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        images, labels, classes = self.images, self.labels, self.classes
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"images must be a uint8 tensor of shape (N, C, H, W), got {_describe(images)}")
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels in dim 1, got shape {tuple(images.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise TypeError(f"labels must be an int64 tensor of shape (N,), got {_describe(labels)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries but images has {images.shape[0]}")
        if not isinstance(classes, tuple) or not all(isinstance(name, str) for name in classes):
            raise TypeError(f"classes must be a tuple of str, got {classes!r}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise ValueError(
                f"labels must lie in [0, {len(classes)}) (one per class), "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> LabelledImages:
        """The images at ``indices`` (ints in [0, N), in the order given, repeats allowed, or a
        bool mask of length N), with the same classes."""
        index = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices))
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise ValueError(f"a bool mask of indices must have shape ({len(self)},), got {tuple(index.shape)}")
        elif index.numel() == 0 and index.dim() == 1:
            index = index.to(torch.int64)  # np.asarray([]) is float64
        elif index.is_floating_point() or index.is_complex() or index.dim() != 1:
            raise TypeError(f"indices must be a 1-D sequence of ints or a bool mask, got {_describe(index)}")
        elif int(index.min()) < 0 or int(index.max()) >= len(self):
            raise IndexError(
                f"indices must lie in [0, {len(self)}), got values in [{int(index.min())}, {int(index.max())}]"
            )
        index = index.to(self.images.device, torch.bool if index.dtype == torch.bool else torch.int64)
        return LabelledImages(self.images[index], self.labels[index.to(self.labels.device)], self.classes)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def stratified_subset(labels: np.ndarray | torch.Tensor, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted int64 indices of ``min(limit, N)`` items, each class represented in proportion to
    its size (largest-remainder rounding, ties to the lower label), chosen at random within each
    class from ``seed``. ``labels``: (N,) non-negative ints."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.ndim != 1 or (labels.size and (labels.dtype.kind not in "iu" or int(labels.min()) < 0)):
        raise ValueError(f"labels must be a 1-D array of non-negative ints, got {labels.dtype} of shape {labels.shape}")
    if limit is None:
        raise ValueError("limit must be a positive int, got None")
    _check_limit_and_seed(limit, seed)
    labels = labels.astype(np.int64)
    total = labels.shape[0]
    if limit >= total:
        return np.arange(total, dtype=np.int64)
    counts = np.bincount(labels)
    quota = limit * counts // total  # exact integer arithmetic: no float ties
    remainder = limit * counts - quota * total
    extra = limit - int(quota.sum())
    by_remainder = np.lexsort((np.arange(counts.shape[0]), -remainder))  # largest first, ties to lower label
    quota[by_remainder[:extra]] += 1
    order = np.random.default_rng(seed).permutation(total)
    # Rank of each item within its class, in the random order: keep the first `quota` of each class.
    shuffled = labels[order]
    grouped = np.argsort(shuffled, kind="stable")
    rank = np.empty(total, dtype=np.int64)
    rank[grouped] = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.sort(order[rank < quota[shuffled]])


def _check_limit_and_seed(limit: object, seed: object) -> None:
    if limit is not None:
        check_int(limit, "limit", meaning="or None for all images")
    check_int(seed, "seed", minimum=0)


# ---------------------------------------------------------------------------------------------
# ImageFolder trees in a folder or a zip


@dataclass(frozen=True)
class _Tree:
    """Relative POSIX paths of the files (and the folders) of a folder or a zip, and a reader."""

    location: str  # for messages
    files: list[str]
    folders: set[str]  # every folder, including those only implied by a file path
    read: Callable[[str], bytes]


def _is_skipped(parts: Iterable[str]) -> bool:
    # Dot files include macOS "._name.jpg" resource forks; zips made on macOS add __MACOSX/.
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we do not need, name and extra lengths
_LOCAL_SIGNATURE = b"PK\x03\x04"


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _zip_tree(path: Path, archive: zipfile.ZipFile, mapped: mmap.mmap) -> _Tree:
    """The tree of ``archive``; ``mapped`` is the archive file mapped in memory.

    Stored (uncompressed, unencrypted) members, the usual case for archives of JPEGs, are sliced
    straight from ``mapped`` and their CRC checked here: zipfile's per-member open costs 10 us,
    as much as a tenth of decoding a small JPEG. Other members go through zipfile.
    """
    files: list[str] = []
    folders: set[str] = set()
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        name = info.filename.strip("/")
        if not name:
            continue
        parts = name.split("/")
        folders.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
        if info.is_dir():
            folders.add(name)
        else:
            files.append(name)
            members[name] = info

    def read(name: str) -> bytes:
        info = members[name]
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            data = _stored_member(mapped, info)
            if data is None:
                raise ValueError(
                    f"member {name!r} of zip archive {path} is corrupt: its local header "
                    "is missing or it runs past the end of the archive"
                )
            if zlib.crc32(data) != info.CRC:
                raise ValueError(f"member {name!r} of zip archive {path} is corrupt: CRC-32 mismatch")
            return data
        try:
            return archive.read(info)  # checks the member's CRC
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as err:
            raise ValueError(f"cannot read member {name!r} of zip archive {path}: {err}") from err

    return _Tree(str(path), files, folders, read)


def _stored_member(mapped: mmap.mmap, info: zipfile.ZipInfo) -> bytes | None:
    """The bytes of a stored member, or None when its local header is not where the central
    directory says or its data would run past the end of the file."""
    offset = info.header_offset
    if offset + _LOCAL_HEADER.size > len(mapped):
        return None
    signature, name_length, extra_length = _LOCAL_HEADER.unpack_from(mapped, offset)
    start = offset + _LOCAL_HEADER.size + name_length + extra_length
    if signature != _LOCAL_SIGNATURE or start + info.compress_size > len(mapped):
        return None
    return mapped[start : start + info.compress_size]


def _folder_tree(root: Path, depth: int) -> _Tree:
    """Files and folders of ``root`` down to ``depth`` levels (the layout never goes deeper)."""
    files: list[str] = []
    folders: set[str] = set()
    pending = [(root, "")]
    for _ in range(depth):
        below = []
        for folder, prefix in pending:
            with os.scandir(folder) as entries:
                for entry in entries:
                    relative = f"{prefix}{entry.name}"
                    if entry.is_dir():
                        folders.add(relative)
                        below.append((Path(entry.path), f"{relative}/"))
                    elif entry.is_file():
                        files.append(relative)
        pending = below

    def read(name: str) -> bytes:
        return (root / name).read_bytes()

    return _Tree(str(root), files, folders, read)


def _select_split(tree: _Tree, split: str | None) -> str:
    """The path prefix of the class folders: ``"<split>/"``, or ``""`` when ``split`` is None."""
    if split is None:
        return ""
    splits = sorted(folder for folder in tree.folders if "/" not in folder and not _is_skipped([folder]))
    if split not in splits:
        found = ", ".join(repr(name) for name in splits) if splits else "none"
        raise ValueError(
            f"{tree.location} has no split folder {split!r} (splits found: {found}); "
            "pass split=None when its top level holds the class folders"
        )
    return f"{split}/"


def _catalogue(tree: _Tree, split: str | None) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """(image paths sorted by class then name, their labels, the sorted class names)."""
    prefix = _select_split(tree, split)
    where = f"{tree.location}/{prefix.rstrip('/')}" if prefix else tree.location
    classes = sorted(
        folder[len(prefix) :]
        for folder in tree.folders
        if folder.startswith(prefix) and "/" not in folder[len(prefix) :] and not _is_skipped([folder[len(prefix) :]])
    )
    by_class: dict[str, list[str]] = {name: [] for name in classes}
    for name in tree.files:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split("/")
        if len(parts) == 2 and not _is_skipped(parts) and _is_image_name(parts[1]):
            by_class[parts[0]].append(name)
    if not classes or not any(by_class.values()):
        hint = ""
        if split is None:
            nested = [f for f in tree.files if f.count("/") == 2 and _is_image_name(f)]
            if nested:
                tops = sorted({f.split("/", 1)[0] for f in nested})
                hint = f"; it looks like it has split folders ({', '.join(tops)}): pass split=..."
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"{where}: no images ({extensions}) in class folders <class>/<file>{hint}")
    empty = [name for name in classes if not by_class[name]]
    if empty:
        raise ValueError(
            f"{where}: class folder(s) without images: {', '.join(empty)} "
            "(an empty class would still take a label; remove the folder)"
        )
    paths = [name for cls in classes for name in sorted(by_class[cls])]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(by_class[cls]) for cls in classes])
    return paths, labels, tuple(classes)


def _decode_all(tree: _Tree, paths: list[str], progress: bool | None) -> torch.Tensor:
    """uint8 (N, 3, H, W) of ``paths``; ValueError naming the first file of another size."""
    first = decode_rgb8(tree.read(paths[0]), f"{tree.location}/{paths[0]}")
    height, width = first.shape[:2]
    pixels = np.empty((len(paths), height, width, 3), dtype=np.uint8)  # filled in place: one copy
    pixels[0] = first
    with progress_bar(len(paths), f"reading {Path(tree.location).name}", "img", progress, leave=False) as bar:
        for index in range(1, len(paths)):
            what = f"{tree.location}/{paths[index]}"
            array = decode_rgb8(tree.read(paths[index]), what)
            if array.shape[:2] != (height, width):
                raise ValueError(
                    f"images must all have one size: {what} is {array.shape[0]}x{array.shape[1]} "
                    f"(height x width) but {paths[0]} is {height}x{width}"
                )
            pixels[index] = array
            if index % _PROGRESS_STEP == 0:
                bar.update(_PROGRESS_STEP)
        bar.update(len(paths) - bar.n)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def load_image_folder(
    path: str | os.PathLike,
    split: str | None = "train",
    *,
    limit: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> LabelledImages:
    """Reads an ImageFolder tree (a folder, or a .zip read in memory) into uint8 RGB tensors.

    ``split``: the top-level folder to read (``"train"``, ``"test"`` ...), or None when the top
    level holds the class folders. Classes are the folders under it, sorted by name; their images
    (files with an extension of :data:`fastad.data.IMAGE_EXTENSIONS`, any case; dot files and
    ``__MACOSX`` skipped) are sorted by name. Every image becomes RGB (grey repeated, alpha
    dropped, EXIF orientation applied) and all must share one size.

    ``limit``: read only that many images, in proportion to the class sizes, chosen from ``seed``
    before anything is decoded (see :func:`stratified_subset`); a limit above the number of
    images reads them all. ``progress``: a tqdm bar; None shows it when stderr is a terminal.

    Returns :class:`LabelledImages` with images uint8 (N, 3, H, W) in class-then-name order.
    Raises FileNotFoundError when ``path`` does not exist; ValueError naming the archive, folder
    or file when the split is missing (listing those found), there are no images, a class folder
    is empty, a file cannot be decoded or is not the size of the first.
    """
    if split is not None and (not isinstance(split, str) or not split or "/" in split or "\\" in split):
        raise ValueError(f"split must be a folder name such as 'train', or None, got {split!r}")
    _check_limit_and_seed(limit, seed)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image folder or zip archive not found: {path}")
    with contextlib.ExitStack() as stack:  # a zip stays open (and mapped) while its images are decoded
        if path.is_dir():
            tree = _folder_tree(path, 2 if split is None else 3)
        else:
            try:
                archive = stack.enter_context(zipfile.ZipFile(path))
                handle = stack.enter_context(open(path, "rb"))
                mapped = stack.enter_context(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
            except (zipfile.BadZipFile, OSError, ValueError) as err:
                raise ValueError(f"{path} is neither a folder nor a readable zip archive: {err}") from err
            tree = _zip_tree(path, archive, mapped)
            if not tree.files:
                raise ValueError(f"zip archive {path} is empty")
        return _load_selected(tree, split, limit, seed, progress)


def _load_selected(
    tree: _Tree, split: str | None, limit: int | None, seed: int, progress: bool | None
) -> LabelledImages:
    paths, labels, classes = _catalogue(tree, split)
    if limit is not None:
        keep = stratified_subset(labels, limit, seed)
        paths, labels = [paths[i] for i in keep], labels[keep]
    return LabelledImages(_decode_all(tree, paths, progress), torch.from_numpy(labels), classes)


# ---------------------------------------------------------------------------------------------
# MNIST idx files

_IDX_UBYTE = 0x08


def _idx_candidates(root: Path, stem: str) -> list[Path]:
    """Where ``stem`` may be: ``root`` or torchvision's ``root/MNIST/raw``, plain before .gz."""
    return [place / name for place in (root, root / "MNIST" / "raw") for name in (stem, f"{stem}.gz")]


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in _idx_candidates(root, stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"MNIST file {stem}(.gz) not found in {root} or {root / 'MNIST' / 'raw'}")


def is_mnist_folder(root: str | os.PathLike) -> bool:
    """Whether :func:`load_mnist` finds a training split under ``root`` (checks four paths only)."""
    return any(c.is_file() for c in _idx_candidates(Path(root), "train-images-idx3-ubyte"))


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array of an idx file (gzipped when its name ends in .gz), after checking its
    magic number (0, 0, 0x08 = unsigned byte, ``ndim``) and that its length matches its sizes."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read MNIST file {path}: {err}") from err
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"MNIST file {path} is truncated: {len(data)} bytes, shorter than its {header}-byte header")
    if data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE or data[3] != ndim:
        raise ValueError(
            f"MNIST file {path} has magic number {data[:4].hex()}, expected 000008{ndim:02x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * axis : 8 + 4 * axis], "big") for axis in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(f"MNIST file {path} is {state}: {len(data)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(
    root: str | os.PathLike, split: str = "train", *, limit: int | None = None, seed: int = 0
) -> LabelledImages:
    """Reads MNIST (or any idx data of the same form, e.g. Fashion-MNIST) without torchvision.

    ``root``: the folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-...`` (each plain or .gz), or torchvision's root (the files in ``root/MNIST/raw``).
    ``split``: ``"train"`` or ``"test"``. ``limit`` and ``seed`` as in :func:`load_image_folder`.

    Returns :class:`LabelledImages` with images uint8 (N, 1, 28, 28) and classes "0" .. "9".
    Raises FileNotFoundError when a file is missing; ValueError naming the file when its magic
    number or length is wrong, labels exceed 9, or the two files disagree on the count.
    """
    if split not in _MNIST_PREFIXES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _check_limit_and_seed(limit, seed)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST folder not found: {root}")
    prefix = _MNIST_PREFIXES[split]
    images_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = _read_idx(images_path, 3), _read_idx(labels_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST files disagree: {images_path} holds {images.shape[0]} images "
            f"but {labels_path} holds {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(_MNIST_CLASSES):
        raise ValueError(f"MNIST file {labels_path} holds label {int(labels.max())}; digits are 0 to 9")
    labels = labels.astype(np.int64)
    if limit is not None:
        keep = stratified_subset(labels, limit, seed)
        images, labels = images[keep], labels[keep]
    else:
        images = images.copy()  # np.frombuffer over bytes is read-only
    return LabelledImages(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), _MNIST_CLASSES)

"""fastad.siamese.sources: ImageFolder trees (folder, stored and deflated zip) and MNIST idx files,
built in tmp_path from random pixels written losslessly, then the real CIFAR-10 / MNIST when present."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastad.siamese.sources import LabelledImages, load_image_folder, load_mnist, stratified_subset

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CIFAR = DATA / "cifar10.zip"
MNIST = DATA / "mnist"


# ---------------------------------------------------------------------------------------------
# building trees


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _random_tree(np_rng: np.random.Generator, height: int = 7, width: int = 5) -> tuple[dict[str, bytes], dict]:
    """Members of a train/test ImageFolder tree with decoys, and the expected train split:
    {"classes": [...], "images": uint8 (N, 3, H, W), "labels": [...]} in class-then-name order."""
    members: dict[str, bytes] = {}
    expected_images = []
    classes = ["ant", "bee", "cat"]  # written in another order below: loading must sort them
    sizes = {"cat": 3, "ant": 4, "bee": 2}
    for label, cls in sorted(enumerate(classes), key=lambda x: x[1], reverse=True):
        names = sorted(f"{k:03d}{'.PNG' if k % 2 else '.png'}" for k in range(sizes[cls]))
        rows = []
        for name in names:
            pixels = np_rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            members[f"train/{cls}/{name}"] = _png(pixels)
            rows.append(pixels.transpose(2, 0, 1))
        expected_images.append((label, rows))
    expected_images.sort(key=lambda x: x[0])
    images = [img for _, rows in expected_images for img in rows]
    labels = [label for label, rows in expected_images for _ in rows]
    # decoys that must be skipped
    members["train/ant/.hidden.png"] = b"not an image"
    members["train/ant/._000.png"] = b"macOS resource fork"
    members["__MACOSX/train/ant/._000.png"] = b"macOS resource fork"
    members["train/ant/notes.txt"] = b"text"
    members["train/ant/deeper/999.png"] = _png(np_rng.integers(0, 256, (height + 3, width, 3), dtype=np.uint8))
    members["train/readme.md"] = b"text"
    members["test/ant/000.png"] = _png(np_rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return members, {"classes": ("ant", "bee", "cat"), "images": np.stack(images), "labels": labels}


def _write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _write_folder(root: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _store(kind: str, tmp_path: Path, members: dict[str, bytes]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    if kind == "folder":
        return _write_folder(tmp_path / "tree", members)
    compression = zipfile.ZIP_STORED if kind == "stored-zip" else zipfile.ZIP_DEFLATED
    return _write_zip(tmp_path / "tree.zip", members, compression)


STORAGES = ["folder", "stored-zip", "deflated-zip"]


# ---------------------------------------------------------------------------------------------
# ImageFolder


@pytest.mark.parametrize("kind", STORAGES)
def test_reads_pixels_labels_and_classes_in_sorted_order(
    kind: str, tmp_path: Path, np_rng: np.random.Generator
) -> None:
    members, expected = _random_tree(np_rng)
    path = _store(kind, tmp_path, members)
    data = load_image_folder(path, "train", progress=False)
    assert data.classes == expected["classes"]
    assert data.images.dtype == torch.uint8 and data.images.shape == expected["images"].shape
    np.testing.assert_array_equal(data.images.numpy(), expected["images"])
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == expected["labels"]
    assert len(data) == len(expected["labels"])
    test = load_image_folder(path, "test")
    assert test.classes == ("ant",) and len(test) == 1


@pytest.mark.parametrize("kind", STORAGES)
def test_without_split_level(kind: str, tmp_path: Path, np_rng: np.random.Generator) -> None:
    members, expected = _random_tree(np_rng)
    flat = {name[len("train/") :]: data for name, data in members.items() if name.startswith("train/")}
    path = _store(kind, tmp_path, flat)
    data = load_image_folder(path, None)
    np.testing.assert_array_equal(data.images.numpy(), expected["images"])
    assert data.classes == expected["classes"] and data.labels.tolist() == expected["labels"]
    with pytest.raises(ValueError, match=r"no split folder 'train'.*'ant', 'bee', 'cat'"):
        load_image_folder(path, "train")


def test_missing_split_lists_the_splits_and_split_none_hints(tmp_path: Path, np_rng: np.random.Generator) -> None:
    members, _ = _random_tree(np_rng)
    path = _write_zip(tmp_path / "tree.zip", members)
    with pytest.raises(ValueError, match=r"no split folder 'val'.*'test', 'train'") as err:
        load_image_folder(path, "val")
    assert "__MACOSX" not in str(err.value)
    with pytest.raises(ValueError, match=r"split folders \(test, train\).*split="):
        load_image_folder(path, None)


def test_grey_palette_and_alpha_become_rgb(tmp_path: Path, np_rng: np.random.Generator) -> None:
    grey = np_rng.integers(0, 256, (6, 4), dtype=np.uint8)
    rgba = np_rng.integers(0, 256, (6, 4, 4), dtype=np.uint8)
    palette = Image.fromarray(np_rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)).quantize(colors=16)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    members = {"a/grey.png": _png(grey), "a/rgba.png": _png(rgba), "a/palette.png": buffer.getvalue()}
    data = load_image_folder(_write_zip(tmp_path / "t.zip", members), None)
    assert data.images.shape == (3, 3, 6, 4)
    by_name = dict(zip(sorted(members), data.images.numpy(), strict=True))
    np.testing.assert_array_equal(by_name["a/grey.png"], np.repeat(grey[None], 3, 0))
    np.testing.assert_array_equal(by_name["a/rgba.png"], rgba[:, :, :3].transpose(2, 0, 1))  # alpha dropped
    np.testing.assert_array_equal(by_name["a/palette.png"], np.asarray(palette.convert("RGB")).transpose(2, 0, 1))


def test_exif_orientation_is_applied(tmp_path: Path, np_rng: np.random.Generator) -> None:
    pixels = np_rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif)
    data = load_image_folder(_write_zip(tmp_path / "t.zip", {"a/x.png": buffer.getvalue()}), None)
    np.testing.assert_array_equal(data.images[0].numpy(), np.rot90(pixels, k=-1).transpose(2, 0, 1))


@pytest.mark.parametrize("kind", STORAGES)
def test_mixed_sizes_name_the_odd_file(kind: str, tmp_path: Path, np_rng: np.random.Generator) -> None:
    members = {f"train/a/{k}.png": _png(np_rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)) for k in range(3)}
    members["train/b/odd.png"] = _png(np_rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"train/b/odd\.png is 5x6.*train/a/0\.png is 5x5"):
        load_image_folder(_store(kind, tmp_path, members))


@pytest.mark.parametrize("kind", STORAGES)
def test_undecodable_file_is_named(kind: str, tmp_path: Path, np_rng: np.random.Generator) -> None:
    good = _png(np_rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
    members = {"train/a/0.png": good, "train/a/1.png": good[: len(good) // 2], "train/b/0.png": good}
    with pytest.raises(ValueError, match=r"cannot decode image .*train/a/1\.png"):
        load_image_folder(_store(kind, tmp_path, members))
    members["train/a/1.png"] = b""
    with pytest.raises(ValueError, match=r"train/a/1\.png is empty"):
        load_image_folder(_store(kind, tmp_path / "empty", members))


@pytest.mark.parametrize("kind", STORAGES)
def test_image_past_the_pixel_limit_is_named(kind: str, tmp_path: Path, np_rng: np.random.Generator) -> None:
    # A PNG whose header claims 100000 x 100000 pixels: refused before decoding, as by load_image.
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    huge = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )
    good = _png(np_rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
    members = {"train/a/0.png": good, "train/a/1.png": huge, "train/b/0.png": good}
    with pytest.raises(ValueError, match=r"train/a/1\.png is larger than the image size limit: 10000000000 pixels"):
        load_image_folder(_store(kind, tmp_path, members))


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_corrupt_zip_member_is_named(compression: int, tmp_path: Path, np_rng: np.random.Generator) -> None:
    pixels = np_rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path = _write_zip(tmp_path / "t.zip", {"a/0.png": _png(pixels), "a/1.png": _png(pixels)}, compression)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("a/1.png")
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", raw, info.header_offset + 26)  # the local header's own
    data_start = info.header_offset + 30 + name_length + extra_length
    raw[data_start + info.compress_size // 2] ^= 0xFF  # one flipped byte in the member's data
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"'a/1\.png'.*t\.zip|t\.zip/a/1\.png"):
        load_image_folder(path, None)


def test_bad_paths_and_archives(tmp_path: Path, np_rng: np.random.Generator) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image_folder(tmp_path / "missing.zip")
    (tmp_path / "junk.zip").write_bytes(np_rng.integers(0, 256, 100, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"junk\.zip is neither a folder nor a readable zip"):
        load_image_folder(tmp_path / "junk.zip")
    (tmp_path / "zero.zip").write_bytes(b"")
    with pytest.raises(ValueError, match=r"zero\.zip"):
        load_image_folder(tmp_path / "zero.zip")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w"):
        pass
    with pytest.raises(ValueError, match=r"empty\.zip is empty"):
        load_image_folder(tmp_path / "empty.zip")
    _write_zip(tmp_path / "texts.zip", {"train/a/x.txt": b"x"})
    with pytest.raises(ValueError, match=r"texts\.zip/train: no images"):
        load_image_folder(tmp_path / "texts.zip")
    good = _png(np_rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    _write_folder(tmp_path / "tree", {"train/a/0.png": good, "train/b/notes.txt": b"x"})
    with pytest.raises(ValueError, match="without images: b"):
        load_image_folder(tmp_path / "tree")


@pytest.mark.parametrize(
    "kwargs, message, error",
    [
        ({"split": "a/b"}, "split must be", ValueError),
        ({"split": ""}, "split must be", ValueError),
        ({"limit": 0}, "limit", ValueError),
        ({"limit": 2.5}, "limit", TypeError),
        ({"limit": True}, "limit", TypeError),
        ({"seed": -1}, "seed", ValueError),
    ],
)
def test_bad_arguments(kwargs: dict, message: str, error: type, tmp_path: Path) -> None:
    with pytest.raises(error, match=message):
        load_image_folder(tmp_path, **kwargs)


def test_limit_is_stratified_seeded_and_a_subset(tmp_path: Path, np_rng: np.random.Generator) -> None:
    members, expected = _random_tree(np_rng)  # classes of 4, 2, 3 images
    path = _write_zip(tmp_path / "t.zip", members)
    full = load_image_folder(path)
    for seed in range(6):
        part = load_image_folder(path, limit=6, seed=seed)
        assert torch.bincount(part.labels, minlength=3).tolist() == [3, 1, 2]  # 6 * (4, 2, 3) / 9, largest remainders
        # every image is one of the full set with its label, in the full set's order
        positions = [next(k for k in range(len(full)) if torch.equal(full.images[k], img)) for img in part.images]
        assert positions == sorted(positions) and full.labels[positions].tolist() == part.labels.tolist()
        again = load_image_folder(path, limit=6, seed=seed)
        assert torch.equal(again.images, part.images)
    assert torch.equal(load_image_folder(path, limit=100).images, full.images)


def _apportion(counts: np.ndarray, limit: int) -> list[int]:
    """Largest-remainder apportionment with exact fractions, ties to the lower class."""
    total = int(counts.sum())
    shares = [Fraction(limit * int(c), total) for c in counts]
    seats = [int(s) for s in shares]
    for k in sorted(range(len(counts)), key=lambda k: (-(shares[k] - seats[k]), k))[: limit - sum(seats)]:
        seats[k] += 1
    return seats


def test_stratified_subset_matches_exact_apportionment(np_rng: np.random.Generator) -> None:
    for _ in range(20):
        n_classes = int(np_rng.integers(1, 8))
        labels = np_rng.integers(0, n_classes, int(np_rng.integers(1, 300)))
        limit = int(np_rng.integers(1, labels.shape[0] + 1))
        seed = int(np_rng.integers(0, 1000))
        chosen = stratified_subset(labels, limit, seed)
        assert chosen.dtype == np.int64 and chosen.shape == (limit,)
        assert np.all(np.diff(chosen) > 0)
        counts = np.bincount(labels, minlength=n_classes)
        assert np.bincount(labels[chosen], minlength=n_classes).tolist() == _apportion(counts, limit)
        np.testing.assert_array_equal(stratified_subset(labels, limit, seed), chosen)
    labels = np.repeat(np.arange(4), 500)
    picks = {tuple(stratified_subset(labels, 40, seed)) for seed in range(5)}
    assert len(picks) == 5  # different seeds choose different images


def test_stratified_subset_bad_arguments() -> None:
    for labels, limit, seed in (
        ([[0, 1]], 1, 0),
        ([0, -1], 1, 0),
        ([0.5, 1.0], 1, 0),
        ([0, 1], 0, 0),
        ([0, 1], None, 0),
        ([0, 1], 1, -2),
    ):
        with pytest.raises(ValueError, match="labels|limit|seed"):
            stratified_subset(np.array(labels), limit, seed)
    assert stratified_subset(torch.tensor([2, 0, 2]), 5).tolist() == [0, 1, 2]


def test_labelled_images_checks_and_subset(rng: torch.Generator) -> None:
    images = torch.randint(0, 256, (6, 3, 4, 5), dtype=torch.uint8, generator=rng)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    data = LabelledImages(images, labels, ("a", "b", "c"))
    part = data.subset([4, 0, 4])
    assert torch.equal(part.images, images[[4, 0, 4]]) and part.labels.tolist() == [1, 0, 1]
    assert part.classes == data.classes
    mask = torch.tensor([True, False, False, True, False, True])
    assert data.subset(mask).labels.tolist() == [0, 0, 2]
    assert torch.equal(data.subset(np.array([5], dtype=np.uint8)).images, images[[5]])
    assert len(data.subset([])) == 0
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        data.subset([6])
    with pytest.raises(IndexError):
        data.subset([-1])
    with pytest.raises(TypeError, match="1-D"):
        data.subset([0.5])
    with pytest.raises(ValueError, match="bool mask"):
        data.subset([True, False])
    with pytest.raises(TypeError, match="uint8"):
        LabelledImages(images.float(), labels, ("a", "b", "c"))
    with pytest.raises(ValueError, match="channels"):
        LabelledImages(images[:, :2], labels, ("a", "b", "c"))
    with pytest.raises(TypeError, match="int64"):
        LabelledImages(images, labels.int(), ("a", "b", "c"))
    with pytest.raises(ValueError, match="entries"):
        LabelledImages(images, labels[:5], ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        LabelledImages(images, labels, ("a", "b"))
    with pytest.raises(TypeError, match="tuple of str"):
        LabelledImages(images, labels, ["a", "b", "c"])


def test_progress_bar_runs(tmp_path: Path, np_rng: np.random.Generator, capsys) -> None:
    members, expected = _random_tree(np_rng)
    data = load_image_folder(_write_zip(tmp_path / "t.zip", members), progress=True)
    assert len(data) == len(expected["labels"])


# ---------------------------------------------------------------------------------------------
# MNIST idx


def _idx(array: np.ndarray) -> bytes:
    """An idx file written from its specification: magic (0, 0, 0x08, ndim), big-endian sizes."""
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx(array)
        (folder / (f"{stem}.gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)


def _random_mnist(np_rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np_rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np_rng.integers(0, 10, n, dtype=np.uint8)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("torchvision_layout", [True, False])
def test_mnist_reads_both_splits_and_layouts(
    gz: bool, torchvision_layout: bool, tmp_path: Path, np_rng: np.random.Generator
) -> None:
    folder = tmp_path / "MNIST" / "raw" if torchvision_layout else tmp_path
    train, test = _random_mnist(np_rng, 37), _random_mnist(np_rng, 11)
    _write_mnist(folder, "train", *train, gz)
    _write_mnist(folder, "t10k", *test, gz)
    for split, (images, labels) in (("train", train), ("test", test)):
        data = load_mnist(tmp_path, split)
        assert data.images.dtype == torch.uint8 and data.images.shape == (len(labels), 1, 28, 28)
        np.testing.assert_array_equal(data.images[:, 0].numpy(), images)
        assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels.tolist()
        assert data.classes == tuple("0123456789")
    part = load_mnist(tmp_path, limit=10, seed=3)
    chosen = stratified_subset(train[1], 10, 3)
    np.testing.assert_array_equal(part.images[:, 0].numpy(), train[0][chosen])
    assert part.labels.tolist() == train[1][chosen].tolist()


def test_mnist_damaged_files_are_named(tmp_path: Path, np_rng: np.random.Generator) -> None:
    images, labels = _random_mnist(np_rng, 5)
    _write_mnist(tmp_path, "train", images, labels, gz=False)
    image_file = tmp_path / "train-images-idx3-ubyte"
    label_file = tmp_path / "train-labels-idx1-ubyte"
    good = image_file.read_bytes()

    image_file.write_bytes(good[:-7])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte is truncated"):
        load_mnist(tmp_path)
    image_file.write_bytes(good + b"\0")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte is longer"):
        load_mnist(tmp_path)
    image_file.write_bytes(good[:10])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*(shorter|truncated)"):
        load_mnist(tmp_path)
    image_file.write_bytes(b"\0\0\x0d\x03" + good[4:])  # float data
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte has magic number 00000d03"):
        load_mnist(tmp_path)
    image_file.write_bytes(_idx(images[:4]))
    with pytest.raises(ValueError, match="4 images.*5 labels"):
        load_mnist(tmp_path)
    image_file.write_bytes(good)
    label_file.write_bytes(_idx(np.array([0, 1, 10, 2, 3], dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte holds label 10"):
        load_mnist(tmp_path)
    label_file.unlink()
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels))[:-12])  # cut gzip stream
    with pytest.raises(ValueError, match=r"cannot read MNIST file .*train-labels-idx1-ubyte\.gz"):
        load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="MNIST folder not found"):
        load_mnist(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_mnist(tmp_path, "val")


# ---------------------------------------------------------------------------------------------
# the real data sets


@pytest.mark.skipif(not CIFAR.is_file(), reason=f"CIFAR-10 zip not found at {CIFAR} (see ../shared/data/README.md)")
def test_cifar10_train_split(np_rng: np.random.Generator) -> None:
    data = load_image_folder(CIFAR, "train", progress=False)
    expected_classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert data.images.shape == (50_000, 3, 32, 32) and data.classes == expected_classes
    assert torch.bincount(data.labels).tolist() == [5000] * 10
    # a few images against PIL reading the members itself, in the documented order
    with zipfile.ZipFile(CIFAR) as archive:
        names = sorted(
            (n for n in archive.namelist() if n.startswith("train/") and n.endswith(".jpg")),
            key=lambda n: (n.split("/")[1], n),
        )
        assert len(names) == 50_000
        for k in np_rng.choice(len(names), 5, replace=False):
            pixels = np.asarray(Image.open(archive.open(names[k])).convert("RGB")).transpose(2, 0, 1)
            np.testing.assert_array_equal(data.images[k].numpy(), pixels)
            assert data.classes[data.labels[k]] == names[k].split("/")[1]


@pytest.mark.skipif(not CIFAR.is_file(), reason=f"CIFAR-10 zip not found at {CIFAR} (see ../shared/data/README.md)")
def test_cifar10_test_split_limit() -> None:
    data = load_image_folder(CIFAR, "test", limit=200, seed=1)
    assert data.images.shape == (200, 3, 32, 32) and torch.bincount(data.labels).tolist() == [20] * 10


MNIST_TRAIN_DIGIT_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # published MNIST figures


@pytest.mark.skipif(
    not (MNIST / "MNIST" / "raw").is_dir(), reason=f"MNIST not found at {MNIST} (see ../shared/data/README.md)"
)
def test_mnist_train_and_test() -> None:
    train = load_mnist(MNIST, "train")
    assert train.images.shape == (60_000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == MNIST_TRAIN_DIGIT_COUNTS
    assert 0 < float(train.images.float().mean()) / 255 < 0.2  # dark background, bright strokes
    test = load_mnist(MNIST / "MNIST" / "raw", "test")
    assert test.images.shape == (10_000, 1, 28, 28) and test.labels.shape == (10_000,)

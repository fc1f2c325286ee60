"""``fastad siamese train / detect`` on tiny inputs, in-process."""

from __future__ import annotations

import json
import zipfile
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

from fastad.cli import main
from fastad.siamese import PRETRAINED_PATH, SiameseDetector


def _write_zip(path, n_per_split: dict[str, int], seed: int = 0):
    """An ImageFolder zip of 32x32 smooth colour images: split/class/file.png."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as archive:
        for split, n in n_per_split.items():
            for k in range(n):
                coarse = rng.random((4, 4, 3))
                image = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((32, 32), Image.BILINEAR))
                buffer = BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                archive.writestr(f"{split}/class{k % 2}/{k:04d}.png", buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siamese_cli")
    data = _write_zip(folder / "tiny.zip", {"train": 96, "test": 32})
    model = folder / "tiny.safetensors"
    status = main(
        [
            "siamese",
            "train",
            "--data",
            str(data),
            "--model",
            str(model),
            "--epochs",
            "2",
            "--curve",
            str(folder / "curve.png"),
            "--heldout",
            "32",
            "--set",
            "channels=[4,4,8,8,8]",
            "--set",
            "embed_dim=4",
            "--set",
            "hidden=4",
        ]
    )
    assert status == 0
    return model


def test_train_writes_a_loadable_model_with_its_command(tiny_model):
    assert Image.open(tiny_model.parent / "curve.png").format == "PNG"
    detector = SiameseDetector.load(tiny_model)
    assert detector.epochs == 2 and list(detector.channels) == [4, 4, 8, 8, 8]
    assert len(detector.history_.train_loss) == 2 and len(detector.history_.heldout_loss) == 2
    info = detector.training_info_
    assert info["command"].startswith("fastad siamese train --data") and info["n_images"] == 96
    assert info["pairs"] == "rectangles" and info["pairs_per_epoch"] == 96


def test_train_resumes_from_its_checkpoint(tmp_path, capsys):
    data = _write_zip(tmp_path / "tiny.zip", {"train": 64, "test": 16}, seed=3)
    tiny = ["--set", "channels=[4,4,8,8,8]", "--set", "embed_dim=4", "--set", "hidden=4", "--heldout", "16"]

    def train(model: str, epochs: int, *extra: str) -> int:
        args = ["siamese", "train", "--data", str(data), "--model", str(tmp_path / model), "--epochs", str(epochs)]
        return main([*args, *tiny, *extra])

    assert train("straight.safetensors", 2) == 0
    checkpoint = tmp_path / "train.pt"
    assert train("first.safetensors", 1, "--checkpoint", str(checkpoint)) == 0 and checkpoint.is_file()
    capsys.readouterr()
    assert train("resumed.safetensors", 2, "--checkpoint", str(checkpoint)) == 0
    out = capsys.readouterr().out
    assert "resuming from checkpoint" in out and "epoch 1:" not in out and "epoch 2:" in out
    straight = SiameseDetector.load(tmp_path / "straight.safetensors")
    resumed = SiameseDetector.load(tmp_path / "resumed.safetensors")
    assert resumed.history_.train_loss == straight.history_.train_loss
    for (name, a), b in zip(
        straight.network_.state_dict().items(), resumed.network_.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # Another training's checkpoint: a one-line error naming what differs, the file kept.
    saved = checkpoint.read_bytes()
    assert train("other.safetensors", 3, "--checkpoint", str(checkpoint), "--set", "lr=0.01") == 1
    err = capsys.readouterr().err
    assert "belongs to another training" in err and "lr" in err and len(err.strip().splitlines()) == 1
    assert checkpoint.read_bytes() == saved and not (tmp_path / "other.safetensors").exists()


def test_detect_writes_map_files(tiny_model, tmp_path):
    rng = np.random.default_rng(1)
    template = (rng.random((60, 76, 3)) * 255).astype(np.uint8)
    inspected = template.copy()
    inspected[10:30, 20:40] = (0, 0, 255)
    Image.fromarray(template).save(tmp_path / "a.png")
    Image.fromarray(inspected).save(tmp_path / "b.png")
    out = tmp_path / "out"
    assert (
        main(
            [
                "siamese",
                "detect",
                "--model",
                str(tiny_model),
                "--template",
                str(tmp_path / "a.png"),
                "--inspected",
                str(tmp_path / "b.png"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "detection.json").read_text())
    cells = np.load(out / "map.npy")
    assert cells.shape == (15, 19) and summary["map_shape"] == [15, 19] and summary["step"] == 4
    expected = SiameseDetector.load(tiny_model).detect(tmp_path / "a.png", tmp_path / "b.png").cells
    np.testing.assert_array_equal(cells, expected)
    assert Image.open(out / "map.png").size == (76, 60) and Image.open(out / "overlay.png").size == (76, 60)
    # Tiled from .npy files: the same map.
    np.save(tmp_path / "a.npy", template)
    np.save(tmp_path / "b.npy", inspected)
    assert (
        main(
            [
                "siamese",
                "detect",
                "--model",
                str(tiny_model),
                "--template",
                str(tmp_path / "a.npy"),
                "--inspected",
                str(tmp_path / "b.npy"),
                "--out",
                str(tmp_path / "tiled"),
                "--tile",
                "32",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(np.load(tmp_path / "tiled" / "map.npy"), cells, atol=1e-5)


def test_detect_errors_are_one_line(tiny_model, tmp_path, capsys):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((40, 44, 3), np.uint8)).save(tmp_path / "b.png")
    status = main(
        [
            "siamese",
            "detect",
            "--model",
            str(tiny_model),
            "--template",
            str(tmp_path / "a.png"),
            "--inspected",
            str(tmp_path / "b.png"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert status == 1 and "same size" in capsys.readouterr().err
    status = main(
        [
            "siamese",
            "detect",
            "--model",
            str(tiny_model),
            "--template",
            str(tmp_path / "nope.png"),
            "--inspected",
            str(tmp_path / "b.png"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert status == 1 and "no such file" in capsys.readouterr().err
    status = main(["siamese", "train", "--data", str(tmp_path / "missing.zip"), "--model", str(tmp_path / "m")])
    assert status == 1 and "no such file" in capsys.readouterr().err


def test_shipped_detector_finds_a_blue_rectangle(tmp_path):
    """Out of the box, without training: a blue rectangle pasted on a photo-like picture. The
    weights ship inside the package, so their absence (e.g. left out of the wheel) fails here."""
    assert PRETRAINED_PATH.is_file(), (
        f"the shipped Siamese weights are missing from the installed package: {PRETRAINED_PATH}"
    )
    detector = SiameseDetector.pretrained()
    assert detector.training_info_["command"].startswith("fastad siamese train --data")
    assert len(detector.history_.train_loss) == detector.epochs == 20
    from skimage import data as skdata

    photo = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1).float() / 255  # 512 x 512
    template = torch.nn.functional.interpolate(photo[None], size=(192, 192), mode="area")[0]
    inspected = template.clone()
    inspected[:, 80:104, 60:90] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)
    mask = np.zeros((192, 192), bool)
    mask[80:104, 60:90] = True
    full = detector.detect(template, inspected).full_resolution()
    from fastad.metrics import pixel_auroc

    assert pixel_auroc(mask[None], full[None]) > 0.9


def test_bad_files_are_one_line_errors(tiny_model, tmp_path, capsys):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    status = main(
        [
            "siamese",
            "detect",
            "--model",
            str(tiny_model),
            "--template",
            str(tmp_path / "a.png"),
            "--inspected",
            str(tmp_path / "corrupt.png"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert status == 1 and "cannot decode" in capsys.readouterr().err
    data = bytearray(tiny_model.read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "tampered.safetensors").write_bytes(bytes(data))
    status = main(
        [
            "siamese",
            "detect",
            "--model",
            str(tmp_path / "tampered.safetensors"),
            "--template",
            str(tmp_path / "a.png"),
            "--inspected",
            str(tmp_path / "a.png"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert status == 1 and "checksum" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    status = main(
        [
            "siamese",
            "detect",
            "--model",
            str(tiny_model),
            "--template",
            str(tmp_path / "a.png"),
            "--inspected",
            str(tmp_path / "a.png"),
            "--out",
            str(tmp_path / "file"),
        ]
    )
    assert status == 1 and "error" in capsys.readouterr().err
    status = main(
        ["siamese", "train", "--data", str(tmp_path / "a.png"), "--model", str(tmp_path / "nowhere" / "m.st")]
    )
    assert status == 1 and "not a file in an existing folder" in capsys.readouterr().err

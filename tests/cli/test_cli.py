"""The fastad command end to end: a method registered only in the tests goes through fit, save,
load, predict and evaluate on the synthetic data set, and the report's pictures open."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from html.parser import HTMLParser
from io import BytesIO

import numpy as np
import pytest
import torch

from fastad.cli import main
from fastad.methods import AnomalyModel

from ..conftest import require_lite0
from ..toy_method import ToyMean  # noqa: F401  (registers "toy-mean")

pytest.importorskip("skimage", reason="the synthetic data set is cut from scikit-image's textures")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fastad.data import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "grass", seed=5, n_train=20, n_test_good=6, n_test_per_defect=3
    )


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_fit_predict_evaluate(dataset, tmp_path, capsys):
    from PIL import Image

    from fastad import metrics
    from fastad.data import load_image, open_dataset

    model_path = tmp_path / "toy.safetensors"
    assert (
        main(
            [
                "fit",
                "--method",
                "toy-mean",
                "--data",
                str(dataset),
                "--model",
                str(model_path),
                "--batch-size",
                "8",
                "--set",
                "pool=16",
                "--set",
                "holdout=0.2",
            ]
        )
        == 0
    )
    assert "fitted toy-mean on 16 images" in capsys.readouterr().out
    model = AnomalyModel.load(model_path)
    assert model.pool == 16 and model.batch_size == 8 and model.threshold_ is not None

    # predict: scores equal the library's, maps are 16-bit PNGs at the image size.
    images = sorted(p for p in (dataset / "test").rglob("*.png"))[:4]
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(model_path), "--out", str(out), *map(str, images)]) == 0
    written = json.loads((out / "scores.json").read_text())
    expected = model.predict(torch.stack([load_image(p) for p in images])).scores
    assert [r["path"] for r in written["images"]] == [str(p) for p in images]
    np.testing.assert_allclose([r["score"] for r in written["images"]], expected.numpy(), rtol=1e-5)
    for r in written["images"]:
        assert r["anomalous"] == (r["score"] > written["threshold"])
        with Image.open(out / r["map"]) as im:
            assert im.mode.startswith("I") and im.size == Image.open(images[0]).size
        with Image.open(out / r["overlay"]) as im:
            assert im.mode == "RGB"

    # evaluate: metrics.json holds the agreed keys, consistent with the metrics module.
    report = tmp_path / "report"
    assert main(["evaluate", "--model", str(model_path), "--data", str(dataset), "--report", str(report)]) == 0
    m = json.loads((report / "metrics.json").read_text())
    for key in (
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "f1_max",
        "threshold",
        "latency_ms",
        "throughput_img_s",
        "n_images",
    ):
        assert key in m, key
    test_set = open_dataset(dataset, "test")
    assert m["n_images"] == len(test_set) == 6 + 4 * 3
    labels = torch.tensor([test_set[i]["label"] for i in range(len(test_set))])
    scores = model.predict(torch.stack([test_set[i]["image"] for i in range(len(test_set))])).scores
    assert m["image_auroc"] == pytest.approx(metrics.image_auroc(labels, scores), abs=1e-6)
    assert 0 <= m["aupro"] <= 1 and 0 <= m["pixel_auroc"] <= 1 and 0 < m["f1_max"] <= 1
    assert m["latency_ms"] > 0 and m["throughput_img_s"] > 0
    assert set(m["per_defect"]) == set(test_set.defect_types) - {"good"}

    # The report is one file whose every picture is an embedded PNG that opens.
    parser = _Images()
    parser.feed((report / "report.html").read_text(encoding="utf-8"))
    assert len(parser.sources) >= 2 + 3 * 4
    for src in parser.sources:
        assert src.startswith("data:image/png;base64,")
        with Image.open(BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.load()


def test_bad_command_lines(dataset, tmp_path, capsys):
    model = str(tmp_path / "m.safetensors")
    assert main(["fit", "--method", "nope", "--data", str(dataset), "--model", model]) == 1
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["fit", "--method", "toy-mean", "--data", str(dataset), "--model", model, "--set", "pool"]) == 1
    assert "key=value" in capsys.readouterr().err
    assert main(["fit", "--method", "toy-mean", "--data", str(dataset), "--model", model, "--set", "colour=1"]) == 1
    assert "colour" in capsys.readouterr().err
    assert (
        main(["fit", "--method", "toy-mean", "--backbone", "resnet18", "--data", str(dataset), "--model", model]) == 1
    )
    assert "no parameter 'backbone'" in capsys.readouterr().err
    assert main(["fit", "--method", "toy-mean", "--data", str(tmp_path / "absent"), "--model", model]) == 1
    assert "absent" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "none.safetensors"),
                "--data",
                str(dataset),
                "--report",
                str(tmp_path),
            ]
        )
        == 1
    )
    assert "none.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--method", "toy-mean"])
    assert exit_info.value.code == 2


def test_info_lists_backbones_and_how_to_provide_them(capsys):
    pytest.importorskip("timm")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert "available" in lines["efficientnet_lite0"] and "missing" not in lines["efficientnet_lite0"]
    for name in ("wide_resnet50_2", "resnet18", "vgg16", "efficientnet_b4"):
        if "missing" in lines[name]:  # unless this machine has them cached: then it says where
            assert "weights=" in lines[name] and ".pth" in lines[name], lines[name]
        else:
            assert "available" in lines[name]
    assert "toy-mean" in out


def test_python_dash_m_fastad_runs():
    out = subprocess.run([sys.executable, "-m", "fastad", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fastad" in out.stdout and "devices:" in out.stdout


@pytest.mark.parametrize(
    "method,extra",
    [
        ("patchcore", ["--set", "coreset_ratio=0.2"]),
        ("spade", ["--set", "k_images=5"]),
        ("padim", ["--set", "n_features=40"]),
        ("gaussian_ad", ["--set", 'layers=["block2", "block4", "head"]']),
        ("mlfsc", ["--set", 'layers=["block1", "block2"]', "--set", "cutoff=0", "--set", "dictionary_steps=5"]),
    ],
)
def test_backbone_methods_through_the_cli(method, extra, dataset, tmp_path, capsys):
    """fit / evaluate of the real methods on Lite0 (the one backbone with offline weights); the
    images are made 64 px so that this stays a few seconds."""
    require_lite0()
    model_path = tmp_path / f"{method}.safetensors"
    assert (
        main(
            [
                "fit",
                "--method",
                method,
                "--backbone",
                "efficientnet_lite0",
                "--data",
                str(dataset),
                "--model",
                str(model_path),
                "--set",
                "resize=64",
                "--set",
                "crop=null",
                *extra,
            ]
        )
        == 0
    )
    assert f"fitted {method} on 18 images" in capsys.readouterr().out
    model = AnomalyModel.load(model_path)
    assert model.method_name == method and model.resize == 64 and model.crop is None
    report = tmp_path / "report"
    assert main(["evaluate", "--model", str(model_path), "--data", str(dataset), "--report", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n_images"] == 18 and 0.0 <= metrics["image_auroc"] <= 1.0
    if method == "gaussian_ad":  # an image-level method: no maps, so no pixel metrics
        assert metrics["pixel_auroc"] is None
    else:
        assert 0.5 < metrics["pixel_auroc"] <= 1.0


# ----------------------------------------------------------------------------- predict on bad image files
# `fastad predict` given a file that is not a usable image: exit status 1, one line on stderr that
# names the file (no traceback), and nothing half-written in --out (outputs are written atomically;
# scores.json only once every image is scored).


@pytest.fixture(scope="module")
def toy_model_file(dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("bad_images_model") / "toy.safetensors"
    assert main(["fit", "--method", "toy-mean", "--data", str(dataset), "--model", str(path), "--set", "pool=16"]) == 0
    return path


def _bad_image(kind: str, dataset, folder):
    """A file named like an image that is not a usable one."""
    import struct
    import zlib

    good = sorted((dataset / "test").rglob("*.png"))[0].read_bytes()
    if kind == "empty":
        data = b""
    elif kind == "truncated":
        data = good[: len(good) // 2]
    elif kind == "text":
        data = b"this is a text file with an image's name\n"
    else:  # "too-large": a header claiming 100000 x 100000 pixels, past PIL's decompression-bomb limit

        def chunk(kind, body):
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

        data = (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b"")
        )
    path = folder / f"bad {kind}.png"
    path.write_bytes(data)
    return path


def _check_one_line_error(err: str, path) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastad predict: error: ") and str(path) in lines[0], err
    assert "Traceback" not in err


@pytest.mark.faults
@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "too-large"])
def test_predict_refuses_a_bad_image_file(kind, dataset, toy_model_file, tmp_path, capsys):
    bad = _bad_image(kind, dataset, tmp_path)
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(toy_model_file), "--out", str(out), str(bad)]) == 1
    _check_one_line_error(capsys.readouterr().err, bad)
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.faults
def test_predict_stops_at_a_bad_image_without_half_written_files(dataset, toy_model_file, tmp_path, capsys):
    """A good image, then a bad one: the good image's map and overlay are complete files (written
    atomically), no scores.json (it would claim a finished run), no temporary files."""
    from PIL import Image

    good = sorted((dataset / "test").rglob("*.png"))[0]
    bad = _bad_image("truncated", dataset, tmp_path)
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(toy_model_file), "--out", str(out), str(good), str(bad)]) == 1
    _check_one_line_error(capsys.readouterr().err, bad)
    left = sorted(p.name for p in out.iterdir())
    assert "scores.json" not in left and not [name for name in left if name.startswith(".") or name.endswith(".tmp")], (
        left
    )
    for name in left:
        with Image.open(out / name) as image:
            image.load()  # complete: decodes every pixel


@pytest.mark.parametrize("option", ["predict", "evaluate"])
def test_an_output_path_that_is_a_file_is_named(option, dataset, toy_model_file, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    image = sorted((dataset / "test").rglob("*.png"))[0]
    args = (
        ["predict", "--model", str(toy_model_file), "--out", str(taken), str(image)]
        if option == "predict"
        else ["evaluate", "--model", str(toy_model_file), "--data", str(dataset), "--report", str(taken)]
    )
    assert main(args) == 1
    flag = "--out" if option == "predict" else "--report"
    assert capsys.readouterr().err.strip() == (
        f"fastad {option}: error: {flag} {taken} exists and is not a folder; give a folder for the output files"
    )
    assert taken.read_text() == "keep me"


def test_predict_tiled_writes_a_georeferenced_map(tmp_path, capsys):
    # fit at native resolution (no resize, no crop), then a scene larger than any training image
    # scored in tiles: a GeoTIFF map with the scene's georeference, a quick-look, and scores.json.
    require_lite0()
    rasterio = pytest.importorskip("rasterio", reason="rasterio is not installed (pip install 'fastad[geo]')")
    from affine import Affine

    from fastad.data import load_image, make_synthetic_dataset
    from fastad.highres import predict_large

    # Small images, few of them: two fits (one tile by tile) and two tiled predictions.
    dataset = make_synthetic_dataset(
        tmp_path / "grass", seed=5, size=128, n_train=4, n_test_good=2, n_test_per_defect=1
    )

    model_path = tmp_path / "patchcore.safetensors"
    assert (
        main(
            [
                "fit",
                "--method",
                "patchcore",
                "--backbone",
                "efficientnet_lite0",
                "--data",
                str(dataset),
                "--model",
                str(model_path),
                "--set",
                "resize=null",
                "--set",
                "crop=null",
                "--set",
                "holdout=0",
                "--set",
                "coreset_ratio=1",
            ]
        )
        == 0
    )
    # The same fit, each training image read tile by tile: the same bank (all patches kept, so no
    # near-tie in the coreset can make the two differ).
    tiled_path = tmp_path / "patchcore-tiled.safetensors"
    assert (
        main(
            [
                "fit",
                "--method",
                "patchcore",
                "--backbone",
                "efficientnet_lite0",
                "--data",
                str(dataset),
                "--model",
                str(tiled_path),
                "--set",
                "resize=null",
                "--set",
                "crop=null",
                "--set",
                "coreset_ratio=1",
                "--tile",
                "64",
            ]
        )
        == 0
    )
    torch.testing.assert_close(
        AnomalyModel.load(tiled_path).bank_, AnomalyModel.load(model_path).bank_, rtol=1e-4, atol=1e-4
    )
    tiles = [load_image(p) for p in sorted((dataset / "test").rglob("*.png"))[:4]]
    scene = torch.cat([torch.cat(tiles[:2], dim=2), torch.cat(tiles[2:], dim=2)], dim=1)  # 2 x 2 images
    pixels = (scene.numpy() * 255 + 0.5).astype(np.uint8)
    transform = Affine(2.0, 0.0, 300000.0, 0.0, -2.0, 5000000.0)
    path = tmp_path / "scene.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=pixels.shape[1],
        width=pixels.shape[2],
        count=3,
        dtype="uint8",
        crs="EPSG:3035",
        transform=transform,
        tiled=True,
        compress="deflate",
    ) as ds:
        ds.write(pixels)
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(model_path), "--out", str(out), "--tile", "128", str(path)]) == 0
    assert "MP/s" in capsys.readouterr().out
    written = json.loads((out / "scores.json").read_text())["images"][0]
    expected = predict_large(AnomalyModel.load(model_path), torch.from_numpy(pixels.astype(np.float32) / 255), tile=128)
    assert written["score"] == pytest.approx(expected.score, rel=1e-6)
    with rasterio.open(out / written["map"]) as ds:
        assert ds.crs == rasterio.crs.CRS.from_string("EPSG:3035") and ds.transform == transform
        np.testing.assert_allclose(ds.read(1), expected.map, rtol=1e-6)
    assert (out / written["quicklook"]).is_file()
    assert sorted(p.name for p in out.iterdir()) == ["scene_map.tif", "scene_quicklook.png", "scores.json"]


def test_predict_tiled_refuses_a_method_that_does_not_tile(dataset, toy_model_file, tmp_path, capsys):
    image = sorted((dataset / "test").rglob("*.png"))[0]
    assert (
        main(["predict", "--model", str(toy_model_file), "--out", str(tmp_path / "o"), "--tile", "256", str(image)])
        == 1
    )
    err = capsys.readouterr().err
    assert "does not score images tile by tile" in err and "Traceback" not in err

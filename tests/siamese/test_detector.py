"""SiameseDetector: training learns the pair rule, save / load, detection from tensors and files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastad.io import ModelFileError
from fastad.siamese import SiameseDetector, score_map
from fastad.siamese.pairs import RectanglePairs

TINY = dict(channels=(4, 8, 8, 8, 16), embed_dim=8, hidden=8, batch_size=64, lr=3e-3)


def _images(n: int, seed: int) -> torch.Tensor:
    """Smooth random colour fields (uint8 (n, 3, 32, 32)): stand-ins for photos, no blue squares."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    fields = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    fields[:, 2] *= 0.5  # keep the blue channel low, as in most photos
    return (fields * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def trained() -> SiameseDetector:
    images = _images(768, 1)
    train = RectanglePairs(images, seed=0)
    heldout = RectanglePairs(_images(256, 2), seed=1)
    return SiameseDetector(epochs=4, seed=0, **TINY).train(train, heldout, normalization_images=images)


def test_training_learns_the_pair_rule(trained):
    history = trained.history_
    assert len(history.train_loss) == 4 and len(history.heldout_loss) == 4 and len(history.heldout_accuracy) == 4
    assert history.train_loss[-1] < history.train_loss[0]
    # Chance is 0.5: a network that learned nothing cannot pass this.
    assert history.heldout_accuracy[-1] > 0.8


@pytest.mark.parametrize("head,loss", [("distance", "bce"), ("abs_difference", "bce"), ("none", "contrastive")])
def test_every_head_learns_the_pair_rule(head, loss):
    # The embeddings start close together (distances ~0.01): a distance head whose similarity
    # could rise with the distance collapsed the encoder to one point and stayed at chance.
    images = _images(768, 1)
    train = RectanglePairs(images, seed=0)
    heldout = RectanglePairs(_images(256, 2), seed=1)
    detector = SiameseDetector(epochs=4, seed=0, head=head, loss=loss, **TINY)
    history = detector.train(train, heldout, normalization_images=images).history_
    assert history.heldout_accuracy[-1] > 0.8, history


def test_training_is_seeded_and_leaves_the_global_rng_alone():
    train = RectanglePairs(_images(128, 3), seed=0)
    state = torch.random.get_rng_state()
    a = SiameseDetector(epochs=1, seed=5, **TINY).train(train)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = SiameseDetector(epochs=1, seed=5, **TINY).train(train)
    c = SiameseDetector(epochs=1, seed=6, **TINY).train(train)
    for (name, pa), pb in zip(a.network_.state_dict().items(), b.network_.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.network_.encoder[0].weight, c.network_.encoder[0].weight)


def test_detected_rectangle_stands_out(trained):
    template = _images(1, 9)[0].float() / 255
    template = torch.nn.functional.interpolate(template[None], size=(96, 128), mode="bilinear")[0]
    inspected = template.clone()
    inspected[:, 40:64, 60:84] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)
    detection = trained.detect(template, inspected)
    assert detection.step == 4 and detection.cells.shape == (24, 32) and detection.image_size == (96, 128)
    full = detection.full_resolution()
    assert full.shape == (96, 128)
    inside = full[44:60, 64:80].mean()
    far = np.concatenate([full[:16].ravel(), full[-12:].ravel()]).mean()
    assert inside > far + 0.3
    same = trained.detect(template, template).cells
    assert same.max() < detection.cells.max()


def test_save_load_round_trip(trained, tmp_path, rng):
    path = trained.save(tmp_path / "siamese.safetensors")
    loaded = SiameseDetector.load(path)
    assert loaded.get_params() == trained.get_params()
    assert loaded.history_.to_dict() == trained.history_.to_dict()
    t = torch.rand(3, 40, 52, generator=rng)
    i = torch.rand(3, 40, 52, generator=rng)
    torch.testing.assert_close(score_map(loaded.network_, t, i), score_map(trained.network_, t, i), rtol=0, atol=0)


def test_tampered_or_foreign_files_are_refused(trained, tmp_path):
    path = trained.save(tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a weight byte
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        SiameseDetector.load(bad)
    from fastad.io import save_model_file

    other = save_model_file(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, {"method": "patchcore"})
    with pytest.raises(ModelFileError, match="not a SiameseDetector"):
        SiameseDetector.load(other)


def test_detect_from_files_and_tiles(trained, tmp_path, rng):
    from PIL import Image

    t8 = (torch.rand(70, 90, 3, generator=rng) * 255).to(torch.uint8).numpy()
    i8 = t8.copy()
    i8[20:40, 30:50] = (0, 0, 255)
    Image.fromarray(t8).save(tmp_path / "t.png")
    Image.fromarray(i8).save(tmp_path / "i.png")
    np.save(tmp_path / "t.npy", t8)
    np.save(tmp_path / "i.npy", i8)
    from_png = trained.detect(tmp_path / "t.png", tmp_path / "i.png").cells
    from_tensors = trained.detect(
        torch.from_numpy(t8).permute(2, 0, 1) / 255.0, torch.from_numpy(i8).permute(2, 0, 1) / 255.0
    ).cells
    np.testing.assert_allclose(from_png, from_tensors, atol=1e-6)
    tiled = trained.detect(tmp_path / "t.npy", tmp_path / "i.npy", tile=32).cells
    np.testing.assert_allclose(tiled, from_tensors, atol=1e-5)
    dense = trained.detect(tmp_path / "t.png", tmp_path / "i.png", dense=2)
    assert dense.step == 2 and dense.cells.shape == (35, 45)


def test_bad_inputs(trained, tmp_path):
    t = torch.rand(3, 40, 40)
    with pytest.raises(RuntimeError, match="not trained"):
        SiameseDetector().detect(t, t)
    with pytest.raises(ValueError, match="same size"):
        trained.detect(t, t[:, :, :36])
    with pytest.raises(ValueError, match="smaller than the network's 32x32"):
        trained.detect(t[:, :20], t[:, :20])
    with pytest.raises(FileNotFoundError, match="template"):
        trained.detect(tmp_path / "missing.png", tmp_path / "missing.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot decode"):
        trained.detect(tmp_path / "corrupt.png", tmp_path / "corrupt.png")
    nan = t.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        trained.detect(nan, t)
    with pytest.raises(ValueError, match="head 'none'"):
        SiameseDetector(head="none", loss="bce")
    with pytest.raises(ValueError, match="dense must be one of"):
        SiameseDetector(dense=3)
    with pytest.raises(ValueError, match="epochs"):
        SiameseDetector(epochs=0)


def test_grey_and_rgba_files_are_read_as_rgb(trained, tmp_path, rng):
    from PIL import Image

    grey = (torch.rand(48, 48, generator=rng) * 255).to(torch.uint8).numpy()
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 128)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    # Alpha is dropped and grey repeated over RGB: the pair is the same picture twice.
    a = trained.detect(tmp_path / "g.png", tmp_path / "a.png").cells
    np.testing.assert_array_equal(a, trained.detect(tmp_path / "g.png", tmp_path / "g.png").cells)


def test_any_float_dtype_and_compressed_tiff(trained, tmp_path, rng):
    from PIL import Image

    t = torch.rand(3, 44, 52, generator=rng)
    i = torch.rand(3, 44, 52, generator=rng)
    expected = trained.detect(t, i).cells
    np.testing.assert_allclose(trained.detect(t.double(), i.double()).cells, expected, atol=1e-6)
    # An LZW-compressed TIFF cannot be read lazily, but is read whole when no tile is asked for.
    for name, x in (("t", t), ("i", i)):
        pixels = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{name}.tif", compression="tiff_lzw")
    from_tiff = trained.detect(tmp_path / "t.tif", tmp_path / "i.tif").cells
    quantised = trained.detect(
        *(torch.from_numpy(np.array(Image.open(tmp_path / f"{n}.tif"))).permute(2, 0, 1) / 255.0 for n in ("t", "i"))
    ).cells
    np.testing.assert_allclose(from_tiff, quantised, atol=1e-6)


def test_large_pairs_are_tiled_automatically(trained, rng, monkeypatch):
    from fastad.siamese import detector as detector_module

    t = torch.rand(3, 90, 70, generator=rng)
    i = torch.rand(3, 90, 70, generator=rng)
    whole = trained.detect(t, i).cells
    calls = []
    real = detector_module.detect_tiled
    monkeypatch.setattr(detector_module, "AUTO_TILE_PIXELS", 1000)
    monkeypatch.setattr(detector_module, "detect_tiled", lambda *a, **k: calls.append(k["tile"]) or real(*a, **k))
    np.testing.assert_allclose(trained.detect(t, i).cells, whole, atol=1e-5)
    assert calls == [detector_module.AUTO_TILE]


def test_bad_values_and_outputs(trained, tmp_path, rng):
    t = torch.rand(3, 40, 40, generator=rng)
    with pytest.raises(ValueError, match=r"values in \[0, 1\].*divide 0..255"):
        trained.detect(t * 255, t * 255)
    with pytest.raises(ValueError, match=r"looks like \(H, W, C\)"):
        trained.detect(t.permute(1, 2, 0), t.permute(1, 2, 0))
    with pytest.raises(TypeError, match="floating-point dtype"):
        trained.detect(t, t, out=np.zeros((10, 10), dtype=np.int64))
    with pytest.raises(ValueError, match=r"map's shape \(10, 10\)"):
        trained.detect(t, t, out=np.zeros((3, 10, 10), dtype=np.float32))
    out = np.full((10, 10), -1.0, dtype=np.float32)
    assert trained.detect(t, t, out=out).cells is out and (out >= 0).all()
    bad = (t * 1.0).permute(1, 2, 0).numpy().copy()
    bad[5, 5, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    np.save(tmp_path / "ok.npy", t.permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="NaN"):
        trained.detect(tmp_path / "ok.npy", tmp_path / "nan.npy", tile=32)
    with pytest.raises(ValueError, match="is a folder"):
        trained.detect(tmp_path, tmp_path)


@pytest.mark.parametrize("step,size", [(4, (18, 27)), (2, (9, 14)), (1, (5, 7))])
def test_full_resolution_matches_scipy_half_pixel_zoom(step, size, np_rng):
    """Cell (i, j) covers pixels [i*step, (i+1)*step): the map is zoomed on that grid (scipy's
    grid_mode) and cut to the image, a partial last cell keeping its place."""
    from scipy import ndimage

    from fastad.siamese import Detection

    cells = np_rng.random((5, 7)).astype(np.float32)
    full = Detection(cells, step, size).full_resolution()
    expected = ndimage.zoom(cells.astype(np.float64), step, order=1, grid_mode=True, mode="nearest")[
        : size[0], : size[1]
    ]
    np.testing.assert_allclose(full, expected, atol=1e-6)

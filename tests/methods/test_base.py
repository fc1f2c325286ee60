"""The method base class, the registry and model files, through a toy method."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fastad import io as model_io
from fastad.methods import AnomalyModel, Prediction, available_methods, get_method, register_method

from ..toy_method import ToyMean


def images(n, rng, size=64, shift=0.0):
    return (0.4 + 0.1 * torch.rand(n, 3, size, size, generator=rng) + shift).clamp(0, 1)


def test_params_in_the_scikit_learn_manner():
    model = ToyMean(pool=4, holdout=0.2)
    params = model.get_params()
    assert params["pool"] == 4 and params["holdout"] == 0.2
    assert {"device", "batch_size", "blur_sigma", "upsample_mode", "threshold_quantile", "image_score"} <= set(params)
    assert not any(name.endswith("_") for name in params)
    assert ToyMean(**params).get_params() == params
    with pytest.raises(ValueError, match="no parameter 'nope'"):
        model.set_params(nope=1)


def test_registry():
    assert get_method("toy-mean") is ToyMean
    assert "toy-mean" in available_methods()
    with pytest.raises(ValueError, match="unknown method 'missing'"):
        get_method("missing")
    with pytest.raises(ValueError, match="already registered"):

        @register_method("toy-mean")
        class Other(AnomalyModel):
            pass

    with pytest.raises(TypeError):
        register_method("not-a-model")(dict)


def test_fit_streams_and_takes_the_threshold_from_held_back_normal_images(rng):
    x = images(40, rng)
    model = ToyMean(holdout=0.1, batch_size=7, threshold_quantile=0.9)
    seen = []
    original = model._fit_batches

    def spy(batches):
        def tap():
            for b in batches:
                seen.append(b.shape[0])
                yield b

        original(tap())

    model._fit_batches = spy
    assert model.fit(x) is model
    held = x[9::10]  # every 10th image, as the docstring says
    assert sum(seen) == model.n_train_images_ == 36 and max(seen) <= 7
    fit_only = x[torch.arange(40) % 10 != 9]
    torch.testing.assert_close(model.mean_, torch.nn.functional.avg_pool2d(fit_only, 8).double().mean(0).float())
    expected = torch.quantile(model.predict(held).scores.double(), 0.9).item()
    assert model.threshold_ == pytest.approx(expected, rel=1e-6)


def test_held_back_images_are_capped(rng, monkeypatch):
    from fastad.methods import base

    monkeypatch.setattr(base, "MAX_HELD_BACK", 3)
    x = images(40, rng)
    model = ToyMean(holdout=0.2, batch_size=6).fit(x)  # every 5th image until 3 are held
    assert model.n_train_images_ == 37
    fit_only = x[[i for i in range(40) if i not in (4, 9, 14)]]
    torch.testing.assert_close(model.mean_, torch.nn.functional.avg_pool2d(fit_only, 8).double().mean(0).float())
    expected = torch.quantile(model.predict(x[[4, 9, 14]]).scores.double(), model.threshold_quantile).item()
    assert model.threshold_ == pytest.approx(expected, rel=1e-6)


def test_no_threshold_without_holdout(rng):
    model = ToyMean(holdout=0.0).fit(images(8, rng))
    assert model.threshold_ is None and model.n_train_images_ == 8
    assert model.predict(images(2, rng)).is_anomalous is None


def test_predict_maps_at_input_resolution_and_scores(rng):
    model = ToyMean(holdout=0.0).fit(images(10, rng))
    x = images(3, rng, size=64)
    x[1, :, 16:32, 16:32] = 1.0  # a bright defect
    pred = model.predict(x)
    assert isinstance(pred, Prediction)
    assert pred.maps.shape == (3, 64, 64) and pred.scores.shape == (3,)
    assert pred.scores.dtype == torch.float32
    torch.testing.assert_close(pred.scores, pred.maps.amax(dim=(1, 2)))  # image score from the map
    assert pred.scores[1] > pred.scores[0] and pred.scores[1] > pred.scores[2]
    hot = pred.maps[1].argmax()
    assert 8 <= hot // 64 <= 40 and 8 <= hot % 64 <= 40
    # A method's own image score wins over the map's maximum.
    model.image_score = "mean"
    torch.testing.assert_close(model.predict(x).scores, model._score_batch(x)[0].mean(dim=(1, 2)))
    # One image without a batch dimension.
    assert model.predict(x[0]).maps.shape == (1, 64, 64)


def test_fit_accepts_datasets_and_dataloaders(rng):
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    x = images(12, rng)

    class Items(Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"image": x[i], "label": 0, "path": f"{i}.png"}

    a = ToyMean(holdout=0.0).fit(x)
    b = ToyMean(holdout=0.0).fit(Items())
    c = ToyMean(holdout=0.0).fit(DataLoader(TensorDataset(x), batch_size=5))
    for m in (b, c):
        torch.testing.assert_close(m.mean_, a.mean_)


BAD_IMAGES = [
    (lambda: (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), TypeError, r"uint8 images to \[0, 1\]"),
    (lambda: torch.rand(2, 1, 32, 32), ValueError, r"3 \(RGB\) channels"),
    (lambda: torch.rand(2, 4, 32, 32), ValueError, "RGB"),
    (lambda: torch.rand(32, 32), ValueError, r"4-D \(B, 3, H, W\)"),
    (lambda: torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN"),
    (lambda: torch.rand(2, 3, 32, 32) * 5, ValueError, r"values in \[0, 1\]"),
    (lambda: torch.rand(0, 3, 32, 32), ValueError, "empty"),
    (lambda: [1, 2, 3], TypeError, "each element must be images"),
]


@pytest.mark.parametrize("make,exc,message", BAD_IMAGES)
def test_bad_images_raise_clear_errors(make, exc, message):
    with pytest.raises(exc, match=message):
        ToyMean().fit(make())


def test_fit_refuses_anomalous_images_and_bad_parameters(rng):
    x = images(4, rng)
    with pytest.raises(ValueError, match="normal images only"):
        ToyMean().fit([{"image": x, "label": torch.tensor([0, 1, 0, 0])}])
    with pytest.raises(ValueError, match="batch_size"):
        ToyMean(batch_size=0).fit(x)
    with pytest.raises(ValueError, match="holdout"):
        ToyMean(holdout=0.9).fit(x)
    with pytest.raises(RuntimeError, match="not fitted"):
        ToyMean().predict(x)


# -- model files --------------------------------------------------------------------------------


@pytest.fixture
def fitted(rng):
    return ToyMean(pool=4, holdout=0.25).fit(images(16, rng))


def test_save_load_round_trip(fitted, rng, tmp_path):
    path = fitted.save(tmp_path / "m.safetensors")
    loaded = AnomalyModel.load(path)
    assert type(loaded) is ToyMean
    assert loaded.get_params() == fitted.get_params()
    assert loaded.spread_ == fitted.spread_ and loaded.threshold_ == fitted.threshold_
    assert torch.equal(loaded.mean_, fitted.mean_)
    x = images(3, rng)
    a, b = fitted.predict(x), loaded.predict(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert ToyMean.load(path).pool == 4
    header = json.loads(_raw_header(path)["__metadata__"]["fastad"])
    assert header["method"] == "toy-mean" and header["torch_version"] == torch.__version__
    assert "fastad_version" in header and header["params"]["pool"] == 4
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def _raw_header(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def test_tampered_truncated_and_foreign_files_are_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())

    flipped = tmp_path / "flipped.safetensors"
    changed = data.copy()
    changed[-3] ^= 0x40  # a byte of tensor data: still parses, but the digest disagrees
    flipped.write_bytes(changed)
    with pytest.raises(model_io.ModelFileError, match="checksum"):
        AnomalyModel.load(flipped)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(model_io.ModelFileError, match="truncated.safetensors"):
        AnomalyModel.load(truncated)

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(model_io.ModelFileError, match="empty.safetensors"):
        AnomalyModel.load(empty)

    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(model_io.ModelFileError, match="not a fastad model"):
        AnomalyModel.load(foreign)

    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        AnomalyModel.load(tmp_path / "missing.safetensors")


def _rewrite_header(path, out, edit):
    """Writes ``path``'s tensors with an edited header and a matching digest (a deliberate edit)."""
    from safetensors.torch import save_file

    tensors, header = model_io.load_model_file(path)
    edit(header)
    header["digest"] = model_io.tensor_digest(tensors, header)
    save_file(tensors, str(out), metadata={"fastad": json.dumps(header)})


def test_mismatched_files_are_refused(fitted, tmp_path):
    path = fitted.save(tmp_path / "m.safetensors")
    other = tmp_path / "other.safetensors"
    _rewrite_header(path, other, lambda h: h.update(method="no-such-method"))
    with pytest.raises(model_io.ModelFileError, match="no-such-method"):
        AnomalyModel.load(other)
    _rewrite_header(path, other, lambda h: h["params"].update(colour="red"))
    with pytest.raises(model_io.ModelFileError, match="colour"):
        AnomalyModel.load(other)
    _rewrite_header(path, other, lambda h: h.update(format_version=99))
    with pytest.raises(model_io.ModelFileError, match="upgrade fastad"):
        AnomalyModel.load(other)

    @register_method("toy-other")
    class ToyOther(AnomalyModel):
        pass

    with pytest.raises(model_io.ModelFileError, match="not a ToyOther"):
        ToyOther.load(path)


def test_failed_save_leaves_the_old_file_intact(fitted, tmp_path, monkeypatch):
    path = fitted.save(tmp_path / "m.safetensors")
    before = path.read_bytes()

    def broken(f, tensors, metadata):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(model_io, "_write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        fitted.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_save_needs_a_fitted_model_and_a_valid_path(fitted, tmp_path):
    with pytest.raises(RuntimeError, match="not fitted"):
        ToyMean().save(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fitted.save(tmp_path / "no" / "dir" / "m.safetensors")
    with pytest.raises(model_io.ModelFileError, match="is a folder"):
        fitted.save(tmp_path)


def test_predict_takes_one_data_set_item(fitted, rng):
    x = images(1, rng)[0]
    item = {"image": x, "label": 1, "path": "a.png"}
    assert torch.equal(fitted.predict(item).scores, fitted.predict(x).scores)


def test_scalar_tensors_and_edited_headers(fitted, tmp_path):
    fitted.scale_ = torch.tensor(2.5)  # a 0-dim learned tensor
    path = fitted.save(tmp_path / "m.safetensors")
    assert AnomalyModel.load(path).scale_ == 2.5
    edited = tmp_path / "edited.safetensors"
    tensors, header = model_io.load_model_file(path)
    from safetensors.torch import save_file

    header["state"]["threshold_"] = -1.0  # tensors untouched, header changed
    save_file(tensors, str(edited), metadata={"fastad": json.dumps(header)})
    with pytest.raises(model_io.ModelFileError, match="checksum"):
        AnomalyModel.load(edited)


def test_refit_that_fails_leaves_no_fitted_model(fitted, rng):
    with pytest.raises(ValueError):
        fitted.fit(torch.full((2, 3, 64, 64), float("nan")))
    with pytest.raises(RuntimeError, match="not fitted"):
        fitted.predict(images(1, rng))
    with pytest.raises(ValueError, match=r"holdout must be in \[0, 0.5\]"):
        ToyMean(holdout=0.7).fit(images(4, rng))

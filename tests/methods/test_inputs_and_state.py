"""The base class with inputs of several sizes, methods' transforms, learned state that is not a
plain tensor (dicts of tensors, NumPy arrays), image-level methods without maps, and the rule
that only registered methods save."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastad import evaluation
from fastad.data import FolderDataset, ResizeCrop
from fastad.io import atomic_path, write_json
from fastad.methods import AnomalyModel, register_method

from ..toy_method import ToyMean


@register_method("toy-resized")
class ToyResized(ToyMean):
    """ToyMean on 64x64 inputs: its transform resizes whatever it is given."""

    def transform(self):
        return ResizeCrop((64, 64))


@register_method("toy-state")
class ToyState(AnomalyModel):
    """Learned state of every kind the base class stores: a dict of tensors, a NumPy array, a
    JSON value. Scores whole images only (no map), like Gaussian AD."""

    def _fit_batches(self, batches) -> None:
        pooled = torch.cat([F.adaptive_avg_pool2d(b, 1).flatten(1) for b in batches])
        self.stats_ = {"mean": pooled.mean(0), "std": pooled.std(0) + 1e-3}
        self.order_ = np.arange(3, dtype=np.int64)[::-1].copy()
        self.note_ = {"fitted_on": int(pooled.shape[0])}

    def _score_batch(self, images):
        pooled = F.adaptive_avg_pool2d(images, 1).flatten(1)[:, torch.from_numpy(self.order_).to(images.device)]
        z = (pooled - self.stats_["mean"].flip(0)) / self.stats_["std"].flip(0)
        return None, z.norm(dim=1)


def _write_folder(root, sizes, np_rng):
    (root / "good").mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        pixels = (np_rng.random((h, w, 3)) * 60 + 100).astype(np.uint8)
        Image.fromarray(pixels).save(root / "good" / f"{i:03d}.png")
    return root


def test_fit_on_a_data_set_of_mixed_sizes_applies_the_method_transform(tmp_path, np_rng):
    root = _write_folder(tmp_path / "data", [(64, 64), (80, 96), (64, 64), (120, 90), (70, 70)], np_rng)
    dataset = FolderDataset(root, "train")
    model = ToyResized(holdout=0, batch_size=4).fit(dataset)
    assert model.mean_.shape == (3, 8, 8) and model.n_train_images_ == 5
    resized = torch.stack([ResizeCrop((64, 64))(dataset[i])["image"] for i in range(len(dataset))])
    expected = F.avg_pool2d(resized, 8).double().mean(0).float()
    torch.testing.assert_close(model.mean_, expected)
    pred = model.predict(dataset)
    assert pred.maps.shape == (5, 64, 64)
    assert dataset.transform is None  # the user's data set is not changed


def test_a_data_set_with_its_own_transform_is_taken_as_it_is(tmp_path, np_rng):
    root = _write_folder(tmp_path / "data", [(64, 64), (80, 96)], np_rng)
    dataset = FolderDataset(root, "train", transform=ResizeCrop((32, 32)))
    model = ToyResized(holdout=0).fit(dataset)
    assert model.mean_.shape == (3, 4, 4)


def test_mixed_sizes_batch_by_size_and_predict_refuses_them_clearly(gen):
    a, b = torch.rand(3, 64, 64, generator=gen), torch.rand(3, 32, 48, generator=gen)
    seen = []

    class Recorder(ToyMean):
        def _fit_batches(self, batches):
            for images in batches:
                seen.append(tuple(images.shape))
            self.mean_, self.spread_ = torch.zeros(3, 1, 1), 1.0

    Recorder(holdout=0, batch_size=8).fit([a, a, b, a])
    assert seen == [(2, 3, 64, 64), (1, 3, 32, 48), (1, 3, 64, 64)]
    model = ToyMean(holdout=0).fit(torch.stack([a, a]))
    with pytest.raises(ValueError, match="different sizes .*64x64, then 32x48"):
        model.predict([a, b])


def test_a_corrupt_file_is_named_in_the_error(tmp_path, np_rng):
    root = _write_folder(tmp_path / "data", [(64, 64), (64, 64)], np_rng)
    (root / "good" / "001.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="001.png"):
        ToyResized(holdout=0).fit(FolderDataset(root, "train"))


def test_dict_numpy_and_json_state_round_trip(gen, tmp_path):
    x = torch.rand(12, 3, 32, 32, generator=gen)
    model = ToyState(holdout=0).fit(x)
    path = model.save(tmp_path / "state.safetensors")
    loaded = AnomalyModel.load(path)
    assert isinstance(loaded, ToyState)
    assert set(loaded.stats_) == {"mean", "std"}
    for key in ("mean", "std"):
        assert torch.equal(loaded.stats_[key], model.stats_[key])
    assert isinstance(loaded.order_, np.ndarray) and loaded.order_.tolist() == [2, 1, 0]
    assert loaded.note_ == {"fitted_on": 12}
    assert torch.equal(loaded.predict(x).scores, model.predict(x).scores)


def test_to_moves_tensors_inside_dicts(gen):
    model = ToyState(holdout=0).fit(torch.rand(4, 3, 16, 16, generator=gen))
    moved = model.to("meta")
    assert moved.device == "meta"
    assert all(t.device.type == "meta" for t in moved.stats_.values())


def test_image_level_method_has_no_maps_and_no_pixel_metrics(gen, tmp_path):
    from fastad.data import make_synthetic_dataset, open_dataset

    root = make_synthetic_dataset(tmp_path / "syn", seed=3, n_train=8, n_test_good=3, n_test_per_defect=2, size=64)
    model = ToyState(holdout=0).fit(open_dataset(root, "train"))
    pred = model.predict(torch.rand(2, 3, 64, 64, generator=gen))
    assert pred.maps is None and pred.scores.shape == (2,)
    result = evaluation.evaluate(model, open_dataset(root, "test"), latency_images=1, throughput_batch=2)
    assert result.maps is None
    assert result.metrics["pixel_auroc"] is None and result.metrics["aupro"] is None
    assert result.metrics["image_auroc"] is not None
    from fastad.report import write_report

    page = write_report(result, tmp_path / "report").read_text()
    assert "makes no anomaly maps" in page


def test_only_registered_methods_save(gen, tmp_path):
    class Unregistered(ToyMean):
        pass

    model = Unregistered(holdout=0).fit(torch.rand(2, 3, 16, 16, generator=gen))
    with pytest.raises(TypeError, match="not a registered method"):
        model.save(tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def test_atomic_writes_leave_the_old_file_when_writing_fails(tmp_path):
    path = write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert path.read_text().strip().startswith("{") and '"x": 1' in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


@pytest.fixture
def gen(rng):
    return rng

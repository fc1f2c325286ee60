"""The Siamese detector on the shared path: the estimator base (parameters, model files through
``fastad.load_model``, ``to``, threshold), ``predict`` giving the shared ``Prediction``, and
``evaluate`` / the report / ``fastad evaluate`` on a data set of change pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastad
from fastad import metrics
from fastad.cli import main
from fastad.data import ChangePairs, load_image, open_dataset
from fastad.evaluation import evaluate
from fastad.io import ModelFileError
from fastad.methods import AnomalyModel, available_methods, get_method
from fastad.report import write_report
from fastad.siamese import PRETRAINED_PATH, SiameseDetector

BLUE = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)


def _field(seed: int, height: int = 64, width: int = 80) -> torch.Tensor:
    """A smooth colour field (3, H, W) in [0, 1] with little blue, like a photograph."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 5, 5, generator=g)
    field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    field[2] *= 0.4
    return field


def _changed(template: torch.Tensor, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    y0, y1, x0, x1 = box
    inspected = template.clone()
    inspected[:, y0:y1, x0:x1] = BLUE
    mask = torch.zeros(template.shape[1:], dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return inspected, mask


def _save(image: torch.Tensor, path: Path) -> None:
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)


@pytest.fixture(scope="module")
def detector() -> SiameseDetector:
    return SiameseDetector.pretrained()


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory) -> Path:
    """A change-detection folder: 3 changed pairs, 2 unchanged, one without a mask (skipped)."""
    root = tmp_path_factory.mktemp("pairs")
    for name in ("A", "B", "label"):
        (root / name).mkdir()
    boxes = {"p0.png": (8, 24, 10, 30), "p1.png": (30, 50, 40, 70), "p2.png": (4, 14, 60, 76)}
    for n, name in enumerate(["p0.png", "p1.png", "p2.png", "q0.png", "q1.png", "r0.png"]):
        template = _field(n)
        inspected, mask = (
            _changed(template, boxes[name]) if name in boxes else (template, torch.zeros(64, 80, dtype=bool))
        )
        _save(template, root / "A" / name)
        _save(inspected, root / "B" / name)
        if name != "r0.png":
            Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(root / "label" / name)
    return root


def test_the_detector_is_an_estimator_with_the_shared_parameters(detector):
    assert isinstance(detector, fastad.Estimator) and not isinstance(detector, AnomalyModel)
    params = detector.get_params()
    assert list(params) == SiameseDetector._param_names() and params["window"] == 32
    assert SiameseDetector(**params).get_params() == params
    with pytest.raises(ValueError, match="has no parameter 'windw'"):
        SiameseDetector().set_params(windw=16)
    # It is found by model files, not offered as a method fitted on normal images.
    assert "siamese" not in available_methods()
    with pytest.raises(ValueError, match="not fitted on normal images"):
        get_method("siamese")


def test_predict_gives_the_shared_prediction(detector):
    templates = torch.stack([_field(1), _field(2)])
    changed, mask = _changed(templates[0], (20, 40, 20, 44))
    inspected = torch.stack([changed, templates[1]])
    pred = detector.predict(templates, inspected)
    assert isinstance(pred, fastad.Prediction)
    assert pred.scores.dtype == torch.float32 and pred.maps.shape == (2, 64, 80)
    for n in range(2):  # the maps and scores detect gives, pair by pair
        found = detector.detect(templates[n], inspected[n])
        np.testing.assert_array_equal(pred.maps[n].numpy(), found.full_resolution())
        assert float(pred.scores[n]) == pytest.approx(float(found.cells.max()), abs=0)
    assert pred.threshold == detector.threshold_ == 0.5
    assert pred.is_anomalous.tolist() == [True, False]
    assert float(pred.maps[0][mask].mean()) > float(pred.maps[0][~mask].mean())
    # One pair given as single images, and lists, are the same call.
    one = detector.predict(templates[0], inspected[0])
    assert torch.equal(one.maps[0], pred.maps[0]) and torch.equal(one.scores, pred.scores[:1])
    assert torch.equal(detector.predict(list(templates), list(inspected)).scores, pred.scores)


def test_predict_refuses_bad_pairs(detector):
    with pytest.raises(ValueError, match="2 template"):
        detector.predict(torch.stack([_field(1), _field(2)]), _field(3))
    with pytest.raises(ValueError, match="different sizes"):
        detector.predict([_field(1), _field(2, 48, 48)], [_field(1), _field(2, 48, 48)])
    with pytest.raises(TypeError, match="template must be"):
        detector.predict(np.zeros((3, 8, 8)), _field(1))
    with pytest.raises(ValueError, match="no pairs"):
        detector.predict([], [])


def test_model_files_go_through_the_shared_loader(detector, tmp_path):
    loaded = fastad.load_model(PRETRAINED_PATH)
    assert type(loaded) is SiameseDetector and loaded.threshold_ == 0.5
    path = detector.save(tmp_path / "copy.safetensors")
    again = fastad.load_model(path)
    assert again.get_params() == detector.get_params() and again.threshold_ == detector.threshold_
    pair = (_field(4), _changed(_field(4), (10, 30, 10, 30))[0])
    assert torch.equal(again.predict(*pair).maps, detector.predict(*pair).maps)
    with pytest.raises(ModelFileError, match="not a AnomalyModel"):
        AnomalyModel.load(path)
    # A threshold that a recomputed checksum lets through is still checked.
    from fastad.io import load_model_file, save_model_file

    tensors, header = load_model_file(path)
    header["state"]["threshold_"] = "high"
    save_model_file(tmp_path / "forged.safetensors", tensors, header)
    with pytest.raises(ModelFileError, match="threshold_ must be None or a finite number"):
        fastad.load_model(tmp_path / "forged.safetensors")


def test_to_moves_the_network(detector):
    copy = SiameseDetector.load(PRETRAINED_PATH)
    assert copy.to("cpu") is copy and copy.device == "cpu"
    assert next(copy.network_.parameters()).device.type == "cpu"
    with pytest.raises(ValueError):
        copy.to("nonsense")


def test_change_pairs_evaluate_and_report_like_any_method(detector, pairs_folder, tmp_path):
    data = open_dataset(pairs_folder, "test")
    assert isinstance(data, ChangePairs) and len(data) == 5 and list(data.skipped) == ["r0.png"]
    result = evaluate(detector, data, latency_images=2, throughput_batch=3)
    items = [data[i] for i in range(len(data))]
    pred = detector.predict([it["template"] for it in items], [it["image"] for it in items])
    labels = torch.tensor([it["label"] for it in items])
    masks = torch.stack([it["mask"] for it in items])
    assert labels.tolist() == [1, 1, 1, 0, 0] == data.labels
    torch.testing.assert_close(result.scores, pred.scores, rtol=0, atol=0)
    m = result.metrics
    assert m["image_auroc"] == pytest.approx(metrics.image_auroc(labels, pred.scores))
    assert m["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(masks, pred.maps))
    assert m["aupro"] == pytest.approx(metrics.aupro(masks, pred.maps))
    assert m["threshold"] == 0.5 and m["n_images"] == 5 and m["latency_ms"] > 0 and m["throughput_img_s"] > 0
    assert list(result.per_defect) == ["change"]
    report = write_report(result, tmp_path / "report", title="pairs")
    assert report.is_file() and "pixel_auroc" in report.read_text()


def test_fastad_evaluate_takes_a_siamese_model_and_pairs(pairs_folder, tmp_path, capsys):
    report = tmp_path / "report"
    args = ["evaluate", "--model", str(PRETRAINED_PATH), "--data", str(pairs_folder), "--report", str(report)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skipped r0.png: no change mask" in out
    written = json.loads((report / "metrics.json").read_text())
    assert written["n_images"] == 5 and written["threshold"] == 0.5
    assert (report / "report.html").is_file()
    # predict scores images against a template, as the methods score images alone.
    predict = ["predict", "--model", str(PRETRAINED_PATH), "--out", str(tmp_path / "p")]
    assert main([*predict, str(pairs_folder / "B" / "p1.png")]) == 1
    assert "give --template" in capsys.readouterr().err
    images = [str(pairs_folder / "B" / name) for name in ("p1.png", "q1.png")]
    assert main([*predict, "--template", str(pairs_folder / "A" / "p1.png"), *images]) == 0
    scores = json.loads((tmp_path / "p" / "scores.json").read_text())
    assert scores["threshold"] == 0.5 and scores["template"].endswith("p1.png")
    template, changed = (load_image(pairs_folder / f / "p1.png") for f in ("A", "B"))
    want = SiameseDetector.pretrained().predict(template, changed)
    assert scores["images"][0]["score"] == pytest.approx(float(want.scores[0]))
    assert scores["images"][0]["anomalous"] is True and (tmp_path / "p" / "p1_map.png").is_file()
    toy = ["predict", "--model", str(PRETRAINED_PATH), "--out", str(tmp_path / "t"), "--tile", "64"]
    assert main([*toy, "--template", images[0], images[1]]) == 1
    assert "fastad siamese detect --tile" in capsys.readouterr().err


def test_change_pairs_refuse_what_cannot_be_scored(tmp_path):
    (tmp_path / "A").mkdir()
    with pytest.raises(ValueError, match="no B, label folder"):
        ChangePairs(tmp_path)
    (tmp_path / "B").mkdir()
    (tmp_path / "label").mkdir()
    with pytest.raises(ValueError, match="no complete pair"):
        ChangePairs(tmp_path)
    _save(_field(0), tmp_path / "A" / "x.png")
    _save(_field(0, 32, 32), tmp_path / "B" / "x.png")
    Image.fromarray(np.zeros((64, 80), np.uint8)).save(tmp_path / "label" / "x.png")
    pairs = ChangePairs(tmp_path)
    with pytest.raises(ValueError, match="the sizes differ"):
        pairs[0]
    with pytest.raises(ValueError, match="nothing to train on"):
        open_dataset(tmp_path, "train")
    with pytest.raises(TypeError, match="a SiameseDetector scores template / inspected pairs"):
        SiameseDetector.pretrained()._predict_items([{"image": _field(0), "path": "x.png"}])


def test_a_failed_retraining_leaves_no_half_old_detector():
    # The contract of every estimator: learned state is cleared before a new fit, so a failure
    # cannot leave the old network looking like the result of the new settings.
    detector = SiameseDetector.load(PRETRAINED_PATH)
    assert detector.threshold_ == 0.5
    with pytest.raises(TypeError, match="train_pairs must be a pair source"):
        detector.train("not pairs")
    assert not hasattr(detector, "network_") and not hasattr(detector, "threshold_")
    with pytest.raises(RuntimeError, match="not trained"):
        detector.predict(_field(1), _field(1))

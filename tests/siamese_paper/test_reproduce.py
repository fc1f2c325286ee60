"""benchmarks.siamese_paper: the quick run on the shared data, skipped experiments, cell scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.siamese_paper import EXPERIMENTS, ReproduceConfig, aligned_cell_scores, cell_scores, reproduce
from benchmarks.siamese_paper.common import pooled_pixel_auroc
from fastad.siamese import NetworkConfig, SiameseNet

DATA = Path(__file__).parents[2].parent / "shared" / "data"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib", reason="the experiments draw their figures with matplotlib")


# ---------------------------------------------------------------------------------------------
# Cell-level scoring


def test_cell_scores_of_a_hand_made_map():
    amap = np.zeros((4, 6))
    amap[0, 1] = 5.0  # cell (0, 0)
    amap[3, 2] = 2.0  # cell (1, 1)
    amap[2, 5] = -1.0  # below the zeros around it: cell (1, 2) keeps 0
    amap[1, 4] = 7.0  # cell (0, 2)
    expected = np.array([[5.0, 0.0, 7.0], [0.0, 2.0, 0.0]])
    np.testing.assert_array_equal(cell_scores(amap, (2, 3)), expected)
    np.testing.assert_array_equal(cell_scores(torch.from_numpy(amap), (2, 3)), expected)
    np.testing.assert_array_equal(cell_scores(amap, 1), [[7.0]])


def test_cell_scores_match_a_loop_over_cells(np_rng):
    rows, cols = (int(v) for v in np_rng.integers(1, 7, size=2))
    h, w = (int(v) for v in np_rng.integers(1, 9, size=2))
    amap = np_rng.standard_normal((rows * h, cols * w)).astype(np.float32)
    expected = np.array(
        [[amap[i * h : (i + 1) * h, j * w : (j + 1) * w].max() for j in range(cols)] for i in range(rows)]
    )
    np.testing.assert_array_equal(cell_scores(amap, (rows, cols)), expected)
    if rows == cols:
        np.testing.assert_array_equal(cell_scores(amap, rows), expected)


def test_cell_auroc_agrees_with_scikit_learn(np_rng):
    metrics_sklearn = pytest.importorskip("sklearn.metrics")
    from fastad.metrics import image_auroc

    labels = np.zeros((10, 10), dtype=bool)
    labels.flat[np_rng.permutation(100)[:50]] = True
    amap = np_rng.random((320, 320))
    for i, j in zip(*np.nonzero(labels), strict=True):  # a weak extra response somewhere in each anomalous cell
        y, x = i * 32 + np_rng.integers(32), j * 32 + np_rng.integers(32)
        amap[y, x] += 0.002
    scores = cell_scores(amap, labels.shape)
    assert image_auroc(labels.ravel(), scores.ravel()) == pytest.approx(
        metrics_sklearn.roc_auc_score(labels.ravel(), scores.ravel()), abs=1e-12
    )


def test_cell_scores_reject_bad_input():
    with pytest.raises(ValueError, match="does not split"):
        cell_scores(np.zeros((10, 12)), (3, 4))
    with pytest.raises(ValueError, match="2-D"):
        cell_scores(np.zeros((1, 10, 10)), 2)
    with pytest.raises(ValueError, match="grid rows"):
        cell_scores(np.zeros((10, 10)), 0)
    with pytest.raises(ValueError, match="rows, cols"):
        cell_scores(np.zeros((10, 10)), (2, 5, 1))


@pytest.mark.parametrize("window", [20, 32])
def test_aligned_cell_scores_equal_the_network_on_each_cell(rng, window):
    torch.manual_seed(rng.initial_seed())  # the network's random initialisation
    net = SiameseNet(NetworkConfig(window=window, channels=(4, 8, 8, 8, 16), embed_dim=8, hidden=8)).eval()
    grid = 3
    template = torch.rand(3, grid * window, grid * window, generator=rng)
    inspected = torch.rand(3, grid * window, grid * window, generator=rng)
    # Reference: the network on every cell's own window pair, one crop at a time.
    crops = [
        (
            template[:, r * window : (r + 1) * window, c * window : (c + 1) * window],
            inspected[:, r * window : (r + 1) * window, c * window : (c + 1) * window],
        )
        for r in range(grid)
        for c in range(grid)
    ]
    with torch.no_grad():
        expected = torch.stack([net.anomaly(t[None], i[None])[0, 0, 0] for t, i in crops]).view(grid, grid)
    np.testing.assert_allclose(
        aligned_cell_scores(net, template, inspected, grid), expected.double().numpy(), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="grid"):
        aligned_cell_scores(net, template[:, :-1], inspected[:, :-1], grid)


def test_pooled_pixel_auroc_over_pairs_of_different_sizes(np_rng):
    metrics_sklearn = pytest.importorskip("sklearn.metrics")
    masks = [np_rng.random((5, 7)) < 0.3, np_rng.random((11, 4)) < 0.5]
    maps = [np_rng.random(m.shape) + 0.3 * m for m in masks]
    expected = metrics_sklearn.roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([s.ravel() for s in maps])
    )
    assert pooled_pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Configuration and missing data


def test_missing_data_root_gives_skipped_experiments_with_reasons(tmp_path):
    absent = tmp_path / "no-data-here"
    logs: list[str] = []
    results = reproduce(tmp_path / "out", ReproduceConfig.quick(data_root=absent), log=logs.append)
    for name in EXPERIMENTS:
        assert results[name]["status"] == "skipped", name
        assert results[name]["reason"], name
        assert any(line.startswith(f"[{name}] skipped") for line in logs), name
    assert str(absent / "mnist") in results["mnist_clustering"]["reason"]
    assert str(absent / "cifar10.zip") in results["cifar_learning_curve"]["reason"]
    assert "cifar10.zip" in results["mosaic"]["reason"]
    assert "change_detection" in results["aerial"]["reason"]
    assert results["finished"] is True
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == json.loads(json.dumps(results))
    assert not list((tmp_path / "out").glob("*.png"))


def test_bad_configuration_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar_model"):
        reproduce(tmp_path / "out", ReproduceConfig.quick(cifar_model=tmp_path / "missing.safetensors"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="mosaics"):
        ReproduceConfig.quick(mosaics=0).check()
    with pytest.raises(ValueError, match="cifar_limit"):
        ReproduceConfig(cifar_limit=-3).check()
    with pytest.raises(ValueError, match="lr"):
        ReproduceConfig(lr=float("nan")).check()
    with pytest.raises(ValueError, match="channels"):
        ReproduceConfig(channels=(4, 8, 8)).check()
    with pytest.raises(ValueError, match="device"):
        ReproduceConfig(device="no-such-device").check()
    with pytest.raises(TypeError, match="ReproduceConfig"):
        reproduce(tmp_path / "out", {"seed": 1})


def test_experiments_and_mnist_variants_are_checked_and_select_what_runs(tmp_path):
    full = ReproduceConfig()
    assert full.experiments == EXPERIMENTS
    assert full.mnist_variants == ("none_contrastive", "concat_bce", "distance_bce")
    with pytest.raises(ValueError, match="experiments: unknown 'mnist'"):
        ReproduceConfig(experiments=("mnist",)).check()
    with pytest.raises(ValueError, match="experiments is empty"):
        ReproduceConfig(experiments=()).check()
    with pytest.raises(ValueError, match="twice"):
        ReproduceConfig(mnist_variants=("concat_bce", "concat_bce")).check()
    with pytest.raises(TypeError, match="mnist_variants"):
        ReproduceConfig(mnist_variants="concat_bce").check()
    # The mosaic and the aerial experiment use the detector that experiment 2 makes or loads.
    with pytest.raises(ValueError, match="mosaic need.*cifar_learning_curve"):
        ReproduceConfig(experiments=("mnist_clustering", "mosaic")).check()
    ReproduceConfig(experiments=("cifar_learning_curve", "aerial")).check()
    # Unselected experiments are recorded as skipped, and nothing of theirs is read.
    absent = tmp_path / "no-data-here"
    logs: list[str] = []
    config = ReproduceConfig.quick(data_root=absent, experiments=("mnist_clustering",))
    results = reproduce(tmp_path / "out", config, log=logs.append)
    assert "MNIST not found" in results["mnist_clustering"]["reason"]
    for name in EXPERIMENTS[1:]:
        assert results[name] == {"status": "skipped", "reason": "not selected (experiments setting)", "seconds": 0.0}
        assert not any(line.startswith(f"[{name}]") for line in logs)
    assert results["torch_threads"] == torch.get_num_threads()


def test_quick_is_small_and_takes_overrides():
    quick, full = ReproduceConfig.quick(seed=7), ReproduceConfig()
    assert quick.seed == 7 and quick.mosaics == 1 and quick.cifar_epochs == 1 and quick.mnist_epochs == 1
    assert quick.cifar_limit < 1000 and quick.mnist_limit < 1000
    assert full.cifar_epochs == 20 and full.mosaics == 10 and full.cifar_limit is None
    # The paper's settings: random MNIST pairs (about 10 % same digit) for 100 epochs, a mosaic of
    # CIFAR-10 training images.
    assert full.mnist_epochs == 100 and full.mnist_pairs == 50_000 and full.mnist_similar_fraction is None
    assert full.mosaic_images == "train"
    with pytest.raises(ValueError, match="mosaic_images"):
        ReproduceConfig(mosaic_images="val").check()
    with pytest.raises(ValueError, match="mnist_similar_fraction"):
        ReproduceConfig(mnist_similar_fraction=1.5).check()
    assert json.loads(json.dumps(quick.to_dict()))["channels"] == list(quick.channels)


# ---------------------------------------------------------------------------------------------
# The quick run on the real data


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if not DATA.is_dir():
        pytest.skip(f"the shared data folder {DATA} is absent")
    out = tmp_path_factory.mktemp("reproduce")
    logs: list[str] = []
    results = reproduce(out, ReproduceConfig.quick(data_root=DATA), log=logs.append)
    return out, results, logs


def _expected_status() -> dict[str, str]:
    cifar = (DATA / "cifar10.zip").is_file()
    change = any((DATA / "change_detection" / s / "A").is_dir() for s in ("LEVIR", "DSIFN"))
    done = {
        "mnist_clustering": (DATA / "mnist").is_dir(),
        "cifar_learning_curve": cifar,
        "mosaic": cifar,
        "aerial": cifar and change,
    }
    return {name: "done" if ok else "skipped" for name, ok in done.items()}


def _aurocs(value):
    """Every number stored under a key that names an AUROC, at any depth (lists of them and
    per-pair tables {name: auroc} included; None marks an undefined one and is left out)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if "auroc" in key and not isinstance(item, str):
                items = item.values() if isinstance(item, dict) else item if isinstance(item, list) else [item]
                yield from (x for x in items if x is not None)
            else:
                yield from _aurocs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _aurocs(item)


def test_quick_run_writes_results_and_valid_figures(quick_run):
    from PIL import Image

    out, results, _ = quick_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["finished"] is True and on_disk["torch_version"] == torch.__version__
    assert on_disk["config"]["data_root"] == str(DATA.resolve())
    for name, status in _expected_status().items():
        assert on_disk[name]["status"] == status, (name, on_disk[name].get("reason"))
        assert on_disk[name]["seconds"] >= 0
    aurocs = list(_aurocs(on_disk))
    assert aurocs, "no AUROC recorded"
    for value in aurocs:
        assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, value
    figures = [f for name in EXPERIMENTS for f in on_disk[name].get("figures", [])]
    expected = {
        "mnist_clustering": {"mnist_embeddings.png", "mnist_similarity.png"},
        "cifar_learning_curve": {"cifar_learning_curve.png"},
        "mosaic": {"mosaic.png"},
        "aerial": {"aerial_synthetic.png", "change_detection.png"},
    }
    for name, status in _expected_status().items():
        if status == "done":
            assert set(on_disk[name]["figures"]) == expected[name]
    for figure in figures:
        data = (out / figure).read_bytes()
        assert data.startswith(PNG_SIGNATURE), figure
        with Image.open(out / figure) as image:
            image.verify()
        with Image.open(out / figure) as image:
            assert image.format == "PNG" and min(image.size) > 100
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"


def test_quick_run_numbers(quick_run):
    from PIL import Image

    out, results, _ = quick_run
    status = _expected_status()
    if status["mnist_clustering"] == "done":
        mnist = results["mnist_clustering"]
        assert set(mnist["variants"]) == {"none_contrastive", "concat_bce", "distance_bce"}
        for variant in mnist["variants"].values():
            assert 0.0 <= variant["heldout_accuracy"] <= 1.0
            for key in ("mean_similarity_same_digit", "mean_similarity_different_digit"):
                assert 0.0 <= variant[key] <= 1.0
    if status["cifar_learning_curve"] == "done":
        from fastad.siamese import SiameseDetector

        curve = results["cifar_learning_curve"]
        assert curve["source"] == "trained" and curve["epochs"] == 1
        assert len(curve["train_loss"]) == len(curve["heldout_loss"]) == len(curve["heldout_accuracy"]) == 1
        saved = SiameseDetector.load(out / curve["model"])
        assert saved.history_.train_loss == curve["train_loss"]
        assert saved.channels == ReproduceConfig.quick().channels
    if status["mosaic"] == "done":
        mosaic = results["mosaic"]
        assert len(mosaic["cell_auroc"]) == len(mosaic["pixel_auroc"]) == mosaic["mosaics"] == 1
        assert len(mosaic["aligned_cell_auroc"]) == 1
        assert mosaic["cell_auroc_mean"] == mosaic["cell_auroc"][0]
    if status["aerial"] == "done":
        aerial = results["aerial"]
        assert aerial["synthetic"]["image_size"] == [720, 1260]
        assert aerial["megapixels_per_second"] > 0
        assert "synthetic" in aerial["note"] and "rectangles" in aerial["note"]
        for name, entry in aerial["change_detection"].items():
            assert aerial[f"{name.lower()}_pooled_pixel_auroc"] == entry["pooled_pixel_auroc"]  # the headline keys
            folder = DATA / "change_detection" / name
            complete = sorted(
                p.name
                for p in (folder / "A").glob("*.png")
                if (folder / "B" / p.name).is_file() and (folder / "label" / p.name).is_file()
            )
            assert sorted(entry["pairs"]) == complete
            without_label = {p.name for p in (folder / "A").glob("*.png") if not (folder / "label" / p.name).is_file()}
            assert set(entry["skipped_pairs"]) == without_label
            assert all("label" in reason for reason in entry["skipped_pairs"].values())
            for pair, value in entry["pairs"].items():  # None exactly where the label has one class
                label = np.asarray(Image.open(folder / "label" / pair).convert("L")) >= 128
                assert (value is None) == (label.all() or not label.any()), pair
                assert (pair in entry["undefined_pairs"]) == (value is None), pair
        # The template's grid takes the "before" images of the commonest size; the others are listed.
        sizes = {
            f"{s}/{p.name}": Image.open(p).size
            for s in aerial["change_detection"]
            for p in (DATA / "change_detection" / s / "A").glob("*.png")
        }
        common = max(set(sizes.values()), key=list(sizes.values()).count)
        assert set(aerial["synthetic"]["left_out_images"]) == {n for n, size in sizes.items() if size != common}


def test_one_mnist_variant_alone_repeats_its_numbers_in_the_full_run(quick_run, tmp_path):
    # A long reproduction may train the variants in separate processes: each variant's draws
    # (pairs, batch order, initial weights, plotted digits) do not depend on which others run.
    if _expected_status()["mnist_clustering"] != "done":
        pytest.skip("MNIST is absent from the shared data")
    _, first, _ = quick_run
    config = ReproduceConfig.quick(data_root=DATA, experiments=("mnist_clustering",), mnist_variants=("distance_bce",))
    alone = reproduce(tmp_path / "out", config, log=lambda line: None)["mnist_clustering"]
    assert set(alone["variants"]) == {"distance_bce"}
    timing = {"training_seconds"}
    expected = {k: v for k, v in first["mnist_clustering"]["variants"]["distance_bce"].items() if k not in timing}
    assert {k: v for k, v in alone["variants"]["distance_bce"].items() if k not in timing} == expected
    assert alone["distance_bce_heldout_accuracy"] == first["mnist_clustering"]["distance_bce_heldout_accuracy"]
    assert "concat_bce_heldout_accuracy" not in alone


def test_a_stopped_mnist_training_resumes_from_its_checkpoint(tmp_path):
    # The paper's 100 epochs outlast a working session: a run started again into the same folder
    # goes on from the last finished epoch and ends with the numbers of an uninterrupted run.
    if _expected_status()["mnist_clustering"] != "done":
        pytest.skip("MNIST is absent from the shared data")

    def config(epochs: int) -> ReproduceConfig:
        return ReproduceConfig.quick(
            data_root=DATA, experiments=("mnist_clustering",), mnist_variants=("concat_bce",), mnist_epochs=epochs
        )

    straight = reproduce(tmp_path / "straight", config(2), log=lambda line: None)["mnist_clustering"]
    reproduce(tmp_path / "parts", config(1), log=lambda line: None)  # as if stopped after epoch 1
    assert (tmp_path / "parts" / "checkpoints" / "mnist_concat_bce.pt").is_file()
    logs: list[str] = []
    resumed = reproduce(tmp_path / "parts", config(2), log=logs.append)["mnist_clustering"]
    assert any("resuming from the training checkpoint" in line for line in logs)
    epochs_logged = [line for line in logs if line.startswith("[mnist_clustering concat_bce] epoch")]
    assert len(epochs_logged) == 1 and "epoch 2:" in epochs_logged[0]
    timing = {"training_seconds"}
    expected = {k: v for k, v in straight["variants"]["concat_bce"].items() if k not in timing}
    assert {k: v for k, v in resumed["variants"]["concat_bce"].items() if k not in timing} == expected


def test_rerun_with_the_saved_model_repeats_the_numbers(quick_run, tmp_path):
    out, first, _ = quick_run
    status = _expected_status()
    if status["aerial"] != "done":
        pytest.skip("the first run made no CIFAR-10 detector or found no change-detection images")
    # A data root with only the aerial images: MNIST and the mosaic skip, the saved model is reused.
    root = tmp_path / "data"
    root.mkdir()
    (root / "change_detection").symlink_to(DATA / "change_detection")
    config = ReproduceConfig.quick(data_root=root, cifar_model=out / "siamese_cifar10.safetensors")
    again = reproduce(tmp_path / "out", config, log=lambda line: None)
    assert again["mnist_clustering"]["status"] == "skipped" and again["mosaic"]["status"] == "skipped"
    assert "cifar10.zip" in again["mosaic"]["reason"]
    curve = again["cifar_learning_curve"]
    assert curve["status"] == "done" and curve["source"] == "loaded"
    assert curve["train_loss"] == first["cifar_learning_curve"]["train_loss"]
    assert (tmp_path / "out" / "cifar_learning_curve.png").is_file()
    assert again["aerial"]["synthetic_pixel_auroc"] == first["aerial"]["synthetic_pixel_auroc"]
    for name, entry in first["aerial"]["change_detection"].items():
        assert again["aerial"]["change_detection"][name]["pairs"] == entry["pairs"]

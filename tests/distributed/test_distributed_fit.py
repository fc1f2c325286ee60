"""fit under torch.distributed (gloo, 2 processes on localhost) equals fit in one process: the
PatchCore bank, PaDiM's and Gaussian AD's statistics, the threshold from held-back images, and
the scores; `torchrun ... -m fastad fit` writes the same model file as a single `fastad fit`."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastad
from fastad.io import ModelFileError

from ..conftest import require_lite0
from . import workers
from .test_distributed import _ok, spawn

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch was built without torch.distributed / gloo",
)


@pytest.fixture(scope="module")
def two_process_fits(tmp_path_factory):
    require_lite0()
    results = _ok(
        spawn(
            2,
            "fit",
            ["patchcore", "padim", "gaussian_ad", "spade", "mlfsc", "mlfsc_streamed"],
            tmp_path=tmp_path_factory.mktemp("fit"),
        )
    )
    singles = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (see workers.FIT_PARAMS)
    try:
        for method in ("patchcore", "padim", "gaussian_ad", "spade", "mlfsc"):
            model = fastad.get_method(method)(**workers.FIT_PARAMS[method]).fit(workers.fit_images())
            singles[method] = workers.fitted_state(method, model)
    finally:
        torch.set_num_threads(threads)
    return results, singles


@pytest.mark.parametrize("method", ["patchcore", "spade"])
def test_bank_threshold_and_scores_equal_one_process(method, two_process_fits):
    # PatchCore: the coreset chosen across processes; SPADE: every process's features gathered.
    results, singles = two_process_fits
    one = singles[method]
    assert one["threshold"] is not None  # two images were held back, one in each process's block
    for rank, res in enumerate(results):
        got = res[method]
        assert got["tensors"].keys() == one["tensors"].keys()
        for name, tensor in one["tensors"].items():
            assert torch.equal(got["tensors"][name], tensor), f"rank {rank}: {name}"
        assert got["values"] == one["values"] and got["n"] == one["n"] == 8
        assert got["threshold"] == one["threshold"]
        assert torch.equal(got["scores"], one["scores"]) and torch.equal(got["maps"], one["maps"])


@pytest.mark.parametrize("method", ["padim", "gaussian_ad"])
def test_gaussian_statistics_equal_one_process(method, two_process_fits):
    # Merged in float64 in another order than one process sums them: equal to float64 rounding,
    # which the float32 results keep to a few float32 ulps.
    results, singles = two_process_fits
    one = singles[method]
    for rank, res in enumerate(results):
        got = res[method]
        assert got["tensors"].keys() == one["tensors"].keys()
        for name, tensor in one["tensors"].items():
            torch.testing.assert_close(got["tensors"][name], tensor, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
        assert got["n"] == one["n"] == 8
        assert got["threshold"] == pytest.approx(one["threshold"], rel=1e-5)
        torch.testing.assert_close(got["scores"], one["scores"], rtol=1e-5, atol=1e-6)


def test_methods_that_cannot_merge_say_so(two_process_fits):
    results, _ = two_process_fits
    for res in results:
        assert (
            "MLFSC with dictionary_fit='streamed_omp' does not fit across processes" in res["mlfsc_streamed"]["refused"]
        )


def test_mlfsc_dictionaries_equal_one_process(two_process_fits):
    # The Gram matrices summed in another order than one process sums them, and the sample of
    # patches drawn by global position: the same sample, so the same dictionaries up to float64
    # rounding carried through scikit-learn's LARS (kept far below float32's resolution here).
    results, singles = two_process_fits
    one = singles["mlfsc"]
    for rank, res in enumerate(results):
        got = res["mlfsc"]
        assert got["tensors"].keys() == one["tensors"].keys() and got["n"] == one["n"] == 8
        for name, tensor in one["tensors"].items():
            torch.testing.assert_close(got["tensors"][name], tensor, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
        assert got["threshold"] == pytest.approx(one["threshold"], rel=1e-5)
        torch.testing.assert_close(got["scores"], one["scores"], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def split_fit(tmp_path_factory, two_process_fits):
    folder = tmp_path_factory.mktemp("split")
    results = _ok(spawn(2, "fit_split", str(folder / "split.safetensors"), tmp_path=folder))
    return results, two_process_fits[1]["patchcore"], folder


def test_a_split_bank_scores_as_the_whole_bank(split_fit):
    results, one, _ = split_fit
    whole = one["tensors"]["bank_"]
    rows = torch.cat([res["tensors"]["bank_rows_"] for res in results])
    assert torch.equal(rows.sort().values, torch.arange(whole.shape[0]))  # every row once, kept where it was chosen
    assert all(res["tensors"]["bank_"].shape[0] < whole.shape[0] for res in results)  # no process holds it all
    for res in results:
        assert res["bank_size"] == whole.shape[0]
        assert torch.equal(res["tensors"]["bank_"], whole[res["tensors"]["bank_rows_"]])
        assert res["threshold"] == one["threshold"] and res["n"] == one["n"]
        assert torch.equal(res["scores"], one["scores"]) and torch.equal(res["maps"], one["maps"])
        # The parts loaded back in a group of the same size: each process its own shard.
        assert torch.equal(res["loaded_rows"], res["tensors"]["bank_rows_"])
        assert torch.equal(res["loaded_scores"], one["scores"])
        assert "no process group is running" in res["outside_group"]


def test_a_split_model_loads_whole_in_one_process(split_fit):
    _, one, folder = split_fit
    path = folder / "split.safetensors"
    assert sorted(p.name for p in folder.glob("split*")) == [
        "split.part-1-of-2.safetensors",
        "split.part-2-of-2.safetensors",
        "split.safetensors",
    ]
    model = fastad.AnomalyModel.load(path)
    assert torch.equal(model.bank_, one["tensors"]["bank_"]) and not hasattr(model, "bank_rows_")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(model.predict(workers.fit_images(seed=1, n=4)).scores, one["scores"])
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ModelFileError, match="one part of a model split across processes"):
        fastad.AnomalyModel.load(folder / "split.part-1-of-2.safetensors")


def test_a_split_model_with_a_missing_or_foreign_part_is_refused(split_fit, tmp_path):
    import shutil

    _, _, folder = split_fit
    for name in ("split.safetensors", "split.part-1-of-2.safetensors", "split.part-2-of-2.safetensors"):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "split.part-2-of-2.safetensors").unlink()
    with pytest.raises(ModelFileError, match="part 2, .* is missing"):
        fastad.AnomalyModel.load(tmp_path / "split.safetensors")
    # Part 1 in part 2's place: a valid model-part file, but not the one the model names.
    shutil.copy(tmp_path / "split.part-1-of-2.safetensors", tmp_path / "split.part-2-of-2.safetensors")
    with pytest.raises(ModelFileError, match="is not part 2 of 2"):
        fastad.AnomalyModel.load(tmp_path / "split.safetensors")


def test_a_large_image_predicted_by_two_processes_equals_one(tmp_path, two_process_fits):
    # The tiles are divided among the processes and the maps joined; a PatchCore whose bank is
    # split scores every tile in every process. Everything to the bit: each tile is computed
    # alone (one tile per batch) and with one thread, in either case.

    common = {"backbone": "efficientnet_lite0", "resize": None, "crop": None, "holdout": 0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = workers.fit_images(n=3, size=96)
        models = {
            "patchcore": fastad.PatchCore(**common),
            "spade": fastad.SPADE(**common, k_images=2),
            "mlfsc": fastad.MLFSC(**common, dictionary_steps=5),
        }
        paths = []
        for name, model in models.items():
            model.fit(train)
            paths.append(str(model.save(tmp_path / f"{name}.safetensors")))
        height, width, tile = 160, 224, 64
        results = _ok(spawn(2, "tiled", paths, 5, height, width, tile, tmp_path=tmp_path))
        image = workers.tiled_scene(5, height, width)
        expected = {path: workers.predict_tiled(fastad.AnomalyModel.load(path), image, tile) for path in paths}
        whole = fastad.PatchCore(**workers.NATIVE_PATCHCORE).fit(workers.fit_images())
        expected["split"] = workers.predict_tiled(whole, image, tile)
        fitted_large = workers.fit_large_states(tile)
    finally:
        torch.set_num_threads(threads)
    # fit_large: each process read its block of the images; the model is one process's.
    # MLF-SC's dictionaries: the Gram matrices summed in another order, so to float64 rounding.
    for rank, res in enumerate(results):
        got = res.pop("fit_large")
        for name in ("patchcore", "spade", "mlfsc"):
            assert got[name].keys() == fitted_large[name].keys() and got[name]["n"] == fitted_large[name]["n"]
            for key, value in fitted_large[name].items():
                if key == "n":
                    continue
                if name == "mlfsc":
                    torch.testing.assert_close(got[name][key], value, rtol=1e-5, atol=1e-6)
                else:
                    assert torch.equal(got[name][key], value), f"fit_large {name} {key}, rank {rank}"
    for name, one in expected.items():
        for rank, res in enumerate(results):
            got = res[name]
            assert np.array_equal(got["patch_map"], one["patch_map"]), f"{name}, rank {rank}"
            assert got["score"] == one["score"], f"{name}, rank {rank}"
        assert np.array_equal(results[0][name]["map"], one["map"]), name  # process 0 writes the map
        assert results[1][name]["map"] is None, name


def test_a_rank_that_dies_mid_fit_fails_the_others_and_no_model_is_written(tmp_path):
    require_lite0()
    model_path = tmp_path / "model.safetensors"
    results = spawn(2, "fit_dies", str(model_path), tmp_path=tmp_path)
    assert results[1] == {"exited": 3}
    assert "error" in results[0], f"rank 0 went on without its peer: {results[0]}"
    assert not model_path.exists() and not list(tmp_path.glob("*.safetensors*"))


def test_torchrun_fit_writes_the_one_process_model(tmp_path):
    require_lite0()
    from fastad.data import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "grass", size=96, n_train=6, n_test_good=1, n_test_per_defect=1)
    common = [
        "fit",
        "--method",
        "patchcore",
        "--backbone",
        "efficientnet_lite0",
        "--data",
        str(data),
        "--set",
        "holdout=0",
        "--set",
        "resize=96",
        "--set",
        "crop=null",
        "--batch-size",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "fastad", *common, "--model", str(tmp_path / "one.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "fastad",
            *common,
            "--model",
            str(tmp_path / "two.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "across 2 processes" in multi.stdout
    one = fastad.AnomalyModel.load(tmp_path / "one.safetensors")
    two = fastad.AnomalyModel.load(tmp_path / "two.safetensors")
    assert torch.equal(one.bank_, two.bank_) and one.n_train_images_ == two.n_train_images_ == 6
    images = workers.fit_images(seed=2, n=3, size=96)
    assert torch.equal(one.predict(images).scores, two.predict(images).scores)
    # Rank 0 alone wrote the file: nothing else beside the two models.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "grass") == ["one.safetensors", "two.safetensors"]


def _torchrun(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastad", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_torchrun_padim_and_split_patchcore_fit_and_tiled_predict(tmp_path):
    # The acceptance through the CLI: PaDiM fitted by 2 processes equals 1; a PatchCore
    # with its bank split across 2 processes, saved as parts, predicts a large image tile by tile
    # under torchrun with the single-process model's score and map.
    require_lite0()
    from PIL import Image

    from fastad.data import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "grass", size=96, n_train=6, n_test_good=1, n_test_per_defect=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [
        "--backbone",
        "efficientnet_lite0",
        "--data",
        str(data),
        "--set",
        "holdout=0",
        "--set",
        "resize=null",
        "--set",
        "crop=null",
        "--batch-size",
        "1",
    ]
    runs = {
        "padim-one": [
            sys.executable,
            "-m",
            "fastad",
            "fit",
            "--method",
            "padim",
            *common,
            "--model",
            str(tmp_path / "padim-one.safetensors"),
        ],
        "padim-two": ["fit", "--method", "padim", *common, "--model", str(tmp_path / "padim-two.safetensors")],
        "split": [
            "fit",
            "--method",
            "patchcore",
            *common,
            "--set",
            "shard_bank=true",
            "--model",
            str(tmp_path / "split.safetensors"),
        ],
    }
    single = subprocess.run(runs["padim-one"], capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr
    for name in ("padim-two", "split"):
        done = _torchrun(runs[name], env)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (fastad.AnomalyModel.load(tmp_path / f"padim-{n}.safetensors") for n in ("one", "two"))
    for name, tensor in one._learned_state()[0].items():
        torch.testing.assert_close(two._learned_state()[0][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert sorted(p.name for p in tmp_path.glob("split*")) == [
        "split.part-1-of-2.safetensors",
        "split.part-2-of-2.safetensors",
        "split.safetensors",
    ]

    image = workers.tiled_scene(9, 160, 224)
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / "scene.png")
    predict = ["predict", "--model", str(tmp_path / "split.safetensors"), "--tile", "64"]
    done = _torchrun([*predict, "--out", str(tmp_path / "two"), str(tmp_path / "scene.png")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run(
        [sys.executable, "-m", "fastad", *predict, "--out", str(tmp_path / "one"), str(tmp_path / "scene.png")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )  # one process: the whole bank
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    scores = [json.loads((tmp_path / d / "scores.json").read_text())["images"][0]["score"] for d in ("one", "two")]
    assert scores[0] == scores[1]
    maps = [np.asarray(Image.open(tmp_path / d / "scene_map.tif"), dtype=np.float32) for d in ("one", "two")]
    assert maps[0].shape == (160, 224) and np.array_equal(maps[0], maps[1])

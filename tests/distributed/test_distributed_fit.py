"""fit under torch.distributed (gloo, 2 processes on localhost) equals fit in one process: the
PatchCore bank, PaDiM's and Gaussian AD's statistics, the threshold from held-back images, and
the scores; `torchrun ... -m fastad fit` writes the same model file as a single `fastad fit`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastad

from ..conftest import require_lite0
from . import workers
from .test_distributed import _ok, spawn

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch was built without torch.distributed / gloo")


@pytest.fixture(scope="module")
def two_process_fits(tmp_path_factory):
    require_lite0()
    results = _ok(spawn(2, "fit", ["patchcore", "padim", "gaussian_ad", "spade"],
                        tmp_path=tmp_path_factory.mktemp("fit")))
    singles = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (see workers.FIT_PARAMS)
    try:
        for method in ("patchcore", "padim", "gaussian_ad"):
            model = fastad.get_method(method)(**workers.FIT_PARAMS[method]).fit(workers.fit_images())
            singles[method] = workers.fitted_state(method, model)
    finally:
        torch.set_num_threads(threads)
    return results, singles


def test_patchcore_bank_threshold_and_scores_equal_one_process(two_process_fits):
    results, singles = two_process_fits
    one = singles["patchcore"]
    assert one["threshold"] is not None  # two images were held back, one in each process's block
    for rank, res in enumerate(results):
        got = res["patchcore"]
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
        assert "SPADE does not fit across processes yet" in res["spade"]["refused"]


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
    common = ["fit", "--method", "patchcore", "--backbone", "efficientnet_lite0", "--data", str(data),
              "--set", "holdout=0", "--set", "resize=96", "--set", "crop=null", "--batch-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "fastad", *common, "--model", str(tmp_path / "one.safetensors")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "fastad", *common, "--model", str(tmp_path / "two.safetensors")],
                           capture_output=True, text=True, timeout=300, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "across 2 processes" in multi.stdout
    one = fastad.AnomalyModel.load(tmp_path / "one.safetensors")
    two = fastad.AnomalyModel.load(tmp_path / "two.safetensors")
    assert torch.equal(one.bank_, two.bank_) and one.n_train_images_ == two.n_train_images_ == 6
    images = workers.fit_images(seed=2, n=3, size=96)
    assert torch.equal(one.predict(images).scores, two.predict(images).scores)
    # Rank 0 alone wrote the file: nothing else beside the two models.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "grass") == ["one.safetensors", "two.safetensors"]

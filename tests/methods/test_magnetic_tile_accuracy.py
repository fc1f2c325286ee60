"""PatchCore, SPADE, PaDiM, Gaussian AD and MLF-SC on real defects: the magnetic-tile data (when
../shared/data has it), on
EfficientNet-Lite0, with a subset small enough for the test suite. The whole-set figures are in
benchmarks/RESULTS.md (``python -m benchmarks.accuracy``); the floors here sit well below them
and well above chance, so that a method that stopped finding defects fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fastad
from fastad.data import open_dataset
from fastad.evaluation import evaluate

from ..conftest import require_lite0

ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "magnetic_tile"

pytestmark = [
    pytest.mark.skipif(
        not ROOT.is_dir(), reason=f"magnetic-tile data not found at {ROOT} (see ../shared/data/README.md)"
    ),
]
require_lite0()


class Subset(torch.utils.data.Dataset):
    """Every ``step``-th item of a fastad data set; like one, it takes a method's transform."""

    def __init__(self, dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    @property
    def transform(self):
        return self.dataset.transform

    def with_transform(self, transform):
        return Subset(self.dataset.with_transform(transform), self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


def every(dataset, step: int) -> Subset:
    return Subset(dataset, list(range(0, len(dataset), step)))


@pytest.fixture(scope="module")
def data():
    return every(open_dataset(ROOT, "train"), 4), every(open_dataset(ROOT, "test"), 5)


@pytest.mark.parametrize(
    "method,params,floors",
    [
        ("patchcore", {}, {"image_auroc": 0.75, "pixel_auroc": 0.93, "aupro": 0.7}),
        (
            "spade",
            {"k_images": 10, "resize": 160, "crop": 160},
            {"image_auroc": 0.6, "pixel_auroc": 0.85, "aupro": 0.5},
        ),
        ("padim", {}, {"image_auroc": 0.7, "pixel_auroc": 0.93, "aupro": 0.75}),
        ("gaussian_ad", {"resize": 224, "crop": 224}, {"image_auroc": 0.65}),
        ("mlfsc", {}, {"image_auroc": 0.7, "pixel_auroc": 0.7, "aupro": 0.6}),
    ],
)
def test_defects_are_found(method, params, floors, data):
    train, test = data
    model = fastad.get_method(method)(backbone="efficientnet_lite0", holdout=0, **params).fit(train)
    metrics = evaluate(model, test, latency_images=1, throughput_batch=2).metrics
    print(method, {k: metrics[k] for k in floors})
    for key, floor in floors.items():
        assert metrics[key] >= floor, f"{method}: {key} {metrics[key]:.3f} < {floor} ({metrics})"

"""One validation convention (fastad.checks): a wrong type raises TypeError, a value of the right
type out of range raises ValueError, both naming the parameter; the library's entry points follow
it, and the C++ operators word their checks the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastad
from fastad import ops
from fastad.checks import check_float, check_fraction, check_generator, check_int, check_positive_float
from fastad.data import make_synthetic_dataset
from fastad.gaussian_stats import GaussianAccumulator
from fastad.siamese import SiameseDetector, sample_rectangle
from fastad.siamese.pairs import RectanglePairs
from fastad.tiling import tiled_apply


def test_check_int():
    assert check_int(3, "k") == 3 and check_int(np.int64(3), "k") == 3
    assert type(check_int(np.int32(7), "k")) is int
    assert check_int(0, "k", minimum=0) == 0 and check_int(-5, "k", minimum=None) == -5
    for wrong in (2.0, "3", True, np.bool_(True), None, torch.tensor(3)):
        with pytest.raises(TypeError, match=r"^k must be an int \(the neighbours\), got"):
            check_int(wrong, "k", meaning="the neighbours")
    with pytest.raises(ValueError, match=r"^k must be a positive int, got 0$"):
        check_int(0, "k")
    with pytest.raises(ValueError, match=r"^k must be a non-negative int, got -1$"):
        check_int(-1, "k", minimum=0)
    with pytest.raises(ValueError, match=r"^tile must be an int >= 4, got 3$"):
        check_int(3, "tile", minimum=4)
    with pytest.raises(ValueError, match=r"^seed must be an int in \[0, 9\], got 10$"):
        check_int(10, "seed", minimum=0, maximum=9)


def test_check_float_and_friends():
    assert check_float(np.float32(0.5), "x") == 0.5 and check_float(3, "x") == 3.0
    for wrong in ("0.5", True, None, [0.5]):
        with pytest.raises(TypeError, match="^x must be a number, got"):
            check_float(wrong, "x")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="^x must be a finite number"):
            check_float(bad, "x")
    with pytest.raises(ValueError, match=r"^sigma must be a finite number >= 0, got -1.0$"):
        check_float(-1.0, "sigma", minimum=0.0)
    with pytest.raises(ValueError, match=r"^p must be a number in \[0, 1\], got 1.5$"):
        check_fraction(1.5, "p")
    with pytest.raises(ValueError, match=r"^lr must be a positive finite number, got 0$"):
        check_positive_float(0, "lr")
    with pytest.raises(TypeError, match="^lr must be a positive finite number, got str"):
        check_positive_float("1e-3", "lr")
    assert check_generator(torch.Generator()).device.type == "cpu"
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        check_generator(np.random.default_rng(0))


_X = torch.randn(16, 4)

# (what, a call given a wrong type, a call given a value of the right type out of range, the
# parameter both messages name). The entry points of every part of the library.
ENTRY_POINTS = [
    ("ops.knn", lambda: ops.knn(_X, _X, 2.0), lambda: ops.knn(_X, _X, 17), "k"),
    ("ops.kcenter_greedy", lambda: ops.kcenter_greedy(_X, "3"), lambda: ops.kcenter_greedy(_X, 0), "k"),
    (
        "ops.kcenter_greedy start",
        lambda: ops.kcenter_greedy(_X, 2, start=1.0),
        lambda: ops.kcenter_greedy(_X, 2, start=16),
        "start",
    ),
    ("ops big int", lambda: ops.knn(_X, _X, None), lambda: ops.knn(_X, _X, 2**70), "k"),
    ("GaussianAccumulator", lambda: GaussianAccumulator(2.5, 3), lambda: GaussianAccumulator(0, 3), "positions"),
    (
        "covariance ddof",
        lambda: GaussianAccumulator(1, 2).update(torch.randn(4, 1, 2)).covariance(ddof=0.5),
        lambda: GaussianAccumulator(1, 2).update(torch.randn(4, 1, 2)).covariance(ddof=-1),
        "ddof",
    ),
    (
        "tiled_apply",
        lambda: tiled_apply(torch.nn.Identity(), torch.rand(1, 8, 8), tile=8.0, halo=0),
        lambda: tiled_apply(torch.nn.Identity(), torch.rand(1, 8, 8), tile=0, halo=0),
        "tile",
    ),
    (
        "make_synthetic_dataset",
        lambda: make_synthetic_dataset("/nonexistent/x", n_train="4"),
        lambda: make_synthetic_dataset("/nonexistent/x", n_train=0),
        "n_train",
    ),
    (
        "sample_rectangle",
        lambda: sample_rectangle(32.0, 32, torch.Generator()),
        lambda: sample_rectangle(0, 32, torch.Generator()),
        "height",
    ),
    (
        "RectanglePairs",
        lambda: RectanglePairs(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), p_defect="half"),
        lambda: RectanglePairs(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), p_defect=2.0),
        "p_defect",
    ),
    ("SiameseDetector", lambda: SiameseDetector(epochs=2.0), lambda: SiameseDetector(epochs=0), "epochs"),
    ("SiameseDetector lr", lambda: SiameseDetector(lr="fast"), lambda: SiameseDetector(lr=-1.0), "lr"),
    (
        "AnomalyModel holdout",
        lambda: fastad.PaDiM(holdout="0.1")._check_params(),
        lambda: fastad.PaDiM(holdout=0.9)._check_params(),
        "holdout",
    ),
]


@pytest.mark.parametrize(
    "wrong_type, out_of_range, name", [e[1:] for e in ENTRY_POINTS], ids=[e[0] for e in ENTRY_POINTS]
)
def test_every_entry_point_follows_the_convention(wrong_type, out_of_range, name):
    with pytest.raises(TypeError, match=name):
        wrong_type()
    with pytest.raises(ValueError, match=name):
        out_of_range()


def test_the_operators_word_their_checks_the_same_way():
    # TypeError for a dtype, ValueError for a shape or size: "<name> must be ..., got ...".
    with pytest.raises(TypeError, match=r"^bank must be float32, float16 or bfloat16, got Double"):
        torch.ops.fastad.knn(_X.double(), _X.double(), 1, False, None)
    with pytest.raises(ValueError, match=r"^k must be between 1 and the number of bank rows \(16\), got k = 17"):
        torch.ops.fastad.knn(_X, _X, 17, False, None)
    with pytest.raises(ValueError, match=r"^dictionary atoms must have unit norm \(within 1e-3\), got norm"):
        ops.omp(torch.randn(1, 3, 4), torch.full((1, 2, 4), 2.0), 1)

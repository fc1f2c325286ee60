"""fastad: visual anomaly detection with pretrained deep features, on C++/CUDA kernels
registered as PyTorch operators (``torch.ops.fastad.*``)."""

from __future__ import annotations

from . import _loader

_C = _loader.load_compiled_library()

# The ops and everything built on them need the library loaded first.
from . import ops, reference
from .build import __version__, build_info
from .estimator import Estimator, load_model
from .methods import (
    MLFSC,
    SPADE,
    AnomalyModel,
    GaussianAD,
    PaDiM,
    PatchCore,
    available_methods,
    get_method,
    register_method,
)
from .prediction import Prediction
from .siamese import SiameseDetector

__all__ = [
    "AnomalyModel",
    "Estimator",
    "GaussianAD",
    "MLFSC",
    "PaDiM",
    "PatchCore",
    "Prediction",
    "SPADE",
    "SiameseDetector",
    "available_methods",
    "build_info",
    "get_method",
    "load_model",
    "ops",
    "reference",
    "register_method",
    "__version__",
]

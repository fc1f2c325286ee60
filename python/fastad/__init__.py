"""fastad: visual anomaly detection with pretrained deep features, on C++/CUDA kernels
registered as PyTorch operators (``torch.ops.fastad.*``)."""

from __future__ import annotations

import torch

from . import _loader

_C = _loader.load_compiled_library()

# The ops and everything built on them need the library loaded first.
from . import ops, reference
from ._version import __version__
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


def build_info() -> dict:
    """How this fastad was built and what it can use now.

    Keys: ``version``, ``torch_version`` (torch it was built against), ``cuda`` (CUDA kernels
    compiled), ``cuda_archs`` (TORCH_CUDA_ARCH_LIST used), ``openmp``, ``threads`` (intra-op
    threads), ``parallel_info`` (ATen's description), ``cuda_available`` (a usable GPU now).
    """
    info = dict(_C.build_info())
    info["cuda_available"] = bool(info["cuda"] and torch.cuda.is_available())
    return info


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

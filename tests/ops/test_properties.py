"""The four ops on generated inputs (tests/ops/properties.py), each search in a worker process:
a crash fails its test with the signal instead of ending the run. FASTAD_HYPOTHESIS=long runs
1000 examples per op and device instead of 25."""

from __future__ import annotations

import pytest

from ..conftest import DEVICES


@pytest.mark.hypothesis
@pytest.mark.parametrize("op", ["knn", "kcenter", "mahalanobis", "omp"])
@pytest.mark.parametrize("device", DEVICES)
def test_generated_inputs_match_the_reference_or_raise_clearly(op, device, isolated):
    outcome = isolated.call(f"tests.ops.properties:check_{op}", device, timeout=1800)
    if outcome.skipped():
        pytest.skip(outcome.message)
    if outcome.kind != "returned":
        pytest.fail(f"{op} on {device}: {outcome.describe()}")
    tally = outcome.value
    print(f"{op} on {device}: {tally}")  # shown with -rA; the reliability table's counts
    assert tally.get("checked", 0) + tally.get("raised", 0) > 0

"""Every bad input of every op raises its whole, exact message, on every device, and a crash is
one failed case (each runs in a worker process: tests/isolation.py; the cases:
tests/ops/error_cases.py)."""

from __future__ import annotations

import pytest
import torch

from ..conftest import CUDA_SKIP
from .error_cases import CASES


def _params():
    for case_id, case in CASES.items():
        for device in ("cpu", "cuda"):
            if (device == "cuda" and case.cpu_only) or (device == "cpu" and case.cuda_only):
                continue
            marks = [pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")] if device == "cuda" else []
            yield pytest.param(case_id, device, id=f"{case_id}-{device}", marks=marks)


@pytest.mark.parametrize("case_id,device", list(_params()))
def test_bad_input_raises_its_whole_message(case_id, device, isolated):
    case = CASES[case_id]
    outcome = isolated.call("tests.ops.error_cases:trigger", case_id, device)
    if outcome.kind != "raised":
        pytest.fail(f"{case_id} on {device}: expected {case.exc}, but {outcome.describe()}")
    dev = str(torch.device(device, 0)) if device == "cuda" else device
    expected = case.message.format(dev=dev)
    assert (outcome.exc_type, outcome.message) == (case.exc, expected), outcome.traceback


def test_a_crash_is_one_failed_case(isolated):
    """The runner survives a worker killed by a signal and reports it; the next call works."""
    crashed = isolated.call("tests.ops.test_errors:_die_by_segfault")
    assert crashed.kind == "died" and "SIGSEGV" in crashed.message, crashed.describe()
    assert "fatal" in crashed.log.lower() or "segmentation" in crashed.log.lower(), crashed.log
    again = isolated.call("tests.ops.error_cases:trigger", "knn-k-0", "cpu")
    assert again.kind == "raised" and again.message.endswith("got k = 0")


def _die_by_segfault():
    import faulthandler
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file of a whole torch process
    faulthandler.enable()  # prints "Fatal Python error: Segmentation fault" to the worker's log
    faulthandler._sigsegv()

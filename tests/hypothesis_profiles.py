"""Hypothesis profiles for the generated-input suites, loaded by tests/conftest.py and by the
worker processes that run those suites in isolation (tests/isolation.py).

"fast" keeps `make test` short; "long" is the thorough run (README: ``FASTAD_HYPOTHESIS=long``).
Examples are fresh each run; a failure prints the example and the seed that reproduce it. No
example database: CI starts clean, and no test may depend on what an earlier run found.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("fast", max_examples=25, **_COMMON)
settings.register_profile("long", max_examples=1000, **_COMMON)


def load() -> str:
    """Loads the profile FASTAD_HYPOTHESIS names (default "fast") and returns its name."""
    name = os.environ.get("FASTAD_HYPOTHESIS", "fast")
    settings.load_profile(name)
    return name


load()

"""Property-based tests of every input boundary: whatever arrives, a clear error or success.

The ``properties`` Hypothesis profile (loaded here) makes runs deterministic for CI:
examples are derived from each test's name (``derandomize``), no example database is
written into the tree, and slow examples never fail on time (``deadline=None``). Set
``FLARE_HYPOTHESIS_PROFILE=explore`` to search with fresh random examples, ten times as many,
or ``regressions`` to run only the explicit examples (the bugs found so far).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("properties", derandomize=True, max_examples=100, **_COMMON)
settings.register_profile("explore", derandomize=False, max_examples=1000, **_COMMON)
settings.register_profile("regressions", phases=[Phase.explicit], **_COMMON)  # only the @example cases
settings.load_profile(os.environ.get("FLARE_HYPOTHESIS_PROFILE", "properties"))

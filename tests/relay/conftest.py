"""Sites that dial out: three real agents attached to two real relay processes on loopback.

The sites open no port; the test reaches them as the Airflow side does, through the
relays, with the server kit's identity and end-to-end mutual TLS.
"""

from __future__ import annotations

import pytest
from relay_support import outbound_federation


@pytest.fixture(scope="module")
def relayed(tmp_path_factory):
    yield from outbound_federation(tmp_path_factory.mktemp("relayed"), "relayed", num_relays=2)

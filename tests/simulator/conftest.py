"""The simulator's tests: a real federation to compare with (three agents that dial out to a
relay on loopback, mutual TLS end to end, the digits data split as the simulator splits it)."""

from __future__ import annotations

import uuid

import pytest

from flare_provider.poc import prepare


@pytest.fixture(scope="module")
def real_federation(tmp_path_factory):
    fed = prepare(tmp_path_factory.mktemp("poc"), f"digits_{uuid.uuid4().hex[:6]}", 3, connect="outbound")
    fed.start_agents()
    yield fed
    fed.stop_agents()

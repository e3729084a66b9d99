"""Two real sites that dial out to a real relay, with the digits data and app, for the
model Asset, the data-version trigger and the lineage tests; the server identity is an
environment connection (``AIRFLOW_CONN_<ID>``), as a triggerer reads it too."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from flare_provider.poc import prepare

APP = Path(__file__).resolve().parents[2] / "examples" / "apps" / "digits"


@pytest.fixture(scope="session")
def sites(tmp_path_factory):
    """Started once for the tests of this folder (their changes to the sites' data add up)."""
    fed = prepare(tmp_path_factory.mktemp("assets-poc"), f"assets_{uuid.uuid4().hex[:6]}", 2, connect="outbound")
    fed.start_agents()
    env_var = f"AIRFLOW_CONN_{fed.conn_id.upper()}"
    os.environ[env_var] = fed.connection_json()
    try:
        yield fed
    finally:
        os.environ.pop(env_var, None)
        fed.stop_agents()

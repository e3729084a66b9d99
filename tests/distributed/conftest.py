"""The distributed deployment the failover tests run against, started once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from harness import Harness

# The federation tests' helper (trainings) is shared, not copied.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "federation"))

APP = Path(__file__).resolve().parents[2] / "examples" / "apps" / "digits"


@pytest.fixture(scope="session")
def airflow_db():
    """Replaces the suite's SQLite database here: these tests run Airflow against their own PostgreSQL."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Airflow with the Celery executor (two workers), PostgreSQL, Redis, a triggerer, three
    agents with the digits app deployed, and an S3 server; logs under ``<root>/logs``."""
    harness = Harness(tmp_path_factory.mktemp("distributed"))
    harness.start()
    try:
        harness.federation.deploy_app(APP)
        yield harness
    finally:
        harness.stop()

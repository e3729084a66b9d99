"""One local federation for the reliability tests: real agents on loopback (mutual TLS).

Nine sites are provisioned; the agents of site-1 and site-2 run, the others never start:
their ports are where a test puts an unreachable site, hostile peers or an expired
certificate. The server identity reaches Airflow as an environment connection.
"""

from __future__ import annotations

import logging
import os
import uuid

import pytest
from reliability_support import DIGITS_APP, LIVE_SITES, NUM_SITES, deploy

from flare_provider.client import load_caller_kit
from flare_provider.federation.records import RunSpec
from flare_provider.federation.scatter_gather import ScatterGatherRun
from flare_provider.poc import prepare
from flare_provider.snapshots import SnapshotStore
from flare_provider.wire.tensors import save_file


@pytest.fixture(scope="session")
def fed(tmp_path_factory, airflow_db):
    """The federation, the digits app deployed to the live sites."""
    federation = prepare(tmp_path_factory.mktemp("reliability"), f"reliability_{uuid.uuid4().hex[:6]}", NUM_SITES)
    env_var = f"AIRFLOW_CONN_{federation.conn_id.upper()}"
    os.environ[env_var] = federation.connection_json()
    try:
        federation.start_agents(list(LIVE_SITES))
        deploy(federation, DIGITS_APP, LIVE_SITES)
        yield federation
    finally:
        os.environ.pop(env_var, None)
        federation.stop_agents()


@pytest.fixture(scope="session")
def digits_initial(fed, tmp_path_factory) -> str:
    """The digits app's seeded initial model in a file, built once by site-1 (the step a run
    without an initial model starts with); runs given the file skip that step."""
    spec = RunSpec(federation="initial", run_id="initial", app_name="digits", sites=LIVE_SITES[:1],
                   num_rounds=1, min_clients=1)
    folder = tmp_path_factory.mktemp("initial")
    with ScatterGatherRun(spec, load_caller_kit(fed.server_kit), SnapshotStore(folder.as_uri())) as run:
        weights = run.restore().weights
    save_file(weights, folder / "digits.safetensors")
    return str(folder / "digits.safetensors")


@pytest.fixture
def task_log(capfd, caplog):
    """``task_log()``: what ran in this process logged since the last call. An Airflow
    task's own logger writes to stdout; library loggers may reach pytest's log capture."""
    caplog.set_level(logging.INFO)

    def read() -> str:
        text = capfd.readouterr().out + "\n" + caplog.text
        caplog.clear()
        return text

    return read


@pytest.fixture
def measured(capfd):
    """``measured(text)``: report a measurement (shown with ``pytest -s``)."""

    def show(text: str) -> None:
        with capfd.disabled():
            print(f"\n[measured] {text}")

    return show

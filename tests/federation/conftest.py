"""A local federation for the rounds tests: three real agents that dial out to a relay on
loopback (mutual TLS end to end, no port open at the sites), non-IID digits data, the
server identity imported as an Airflow connection, and a real S3-protocol server for the
snapshots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from s3_server import TEST_KEYS, MotoServer  # tests/ is on sys.path

from flare_provider.poc import prepare


def airflow_cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "airflow", *args], capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def digits_federation(tmp_path_factory, airflow_db):
    """Three sites with skewed label distributions, agents running, connection imported."""
    fed = prepare(tmp_path_factory.mktemp("poc"), f"digits_{uuid.uuid4().hex[:6]}", 3, connect="outbound")
    fed.start_agents()
    airflow_cli("connections", "import", str(fed.connections_file))
    # The same identity as an environment connection too: dag.test() runs triggers in
    # line, where only environment (and secrets-backend) connections can be read.
    env_var = f"AIRFLOW_CONN_{fed.conn_id.upper()}_ENV"
    os.environ[env_var] = fed.connection_json()
    yield fed
    os.environ.pop(env_var, None)
    fed.stop_agents()


@pytest.fixture(scope="module")
def snapshot_bucket(s3, airflow_db):
    """A bucket on the S3 server and an Airflow AWS connection (``aws_test``) to reach it."""
    bucket = f"snapshots-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=bucket)
    extra = json.dumps({"endpoint_url": s3.endpoint, "region_name": TEST_KEYS["region_name"]})
    subprocess.run(
        [sys.executable, "-m", "airflow", "connections", "delete", "aws_test"], capture_output=True, env=os.environ.copy()
    )
    airflow_cli(
        "connections", "add", "aws_test", "--conn-type", "aws", "--conn-login", TEST_KEYS["aws_access_key_id"],
        "--conn-password", TEST_KEYS["aws_secret_access_key"], "--conn-extra", extra,
    )
    return bucket


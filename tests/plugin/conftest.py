"""A real Airflow api-server serving the Federation page, with a real federation behind it.

Module fixtures, in the order they come up:

- ``airflow_home``: a fresh AIRFLOW_HOME (SQLite, SimpleAuthManager with an ``admin`` and a
  ``viewer`` whose passwords the tests know), migrated;
- ``server``: ``airflow api-server`` on a free 127.0.0.1 port, loading this repository's
  ``plugins/`` folder (or the installed entry point); while it starts, ``federation``
  comes up: three agents over mutual TLS on loopback with the digits app deployed, and
  the connections imported (the federation's ``flare`` connection, one ``flare``
  connection that lacks its key, and an AWS connection to a real S3-protocol server
  holding the snapshot store);
- ``page_before_runs``: the page while the store is still empty;
- ``trained``: two runs of a weekly training DAG (``airflow dags test``): the first with
  every site, the second warm-started with site-3 down (it stays down); each ends with a
  cross-site evaluation (site-1 shares its local model).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from plugin_support import (
    APP,
    AWS_CONN_ID,
    BROKEN_CONN_ID,
    DAG_ID,
    DOWN_SITE,
    SHARING_SITE,
    START_TIMEOUT_S,
    TRAIN_DAG,
    USERS,
    AirflowHome,
    Server,
    stop_group,
)
from s3_server import TEST_KEYS, MotoServer  # tests/ is on sys.path

from flare_provider.poc import free_port, prepare


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> AirflowHome:
    root = tmp_path_factory.mktemp("airflow-page")
    home = root / "home"
    (home / "dags").mkdir(parents=True)
    passwords = {user: secrets.token_urlsafe(12) for user in USERS}
    (home / "passwords.json").write_text(json.dumps(passwords))
    s3 = MotoServer(root)
    bucket = f"snapshots-{uuid.uuid4().hex[:8]}"
    snapshot_uri = f"s3://{bucket}/federations"
    # Only this home's settings: nothing from the test session's own Airflow.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__", "FLARE_"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        # The installed package registers the page through its entry point.
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(home / "plugins"),
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__FLARE__DASHBOARD_SNAPSHOT_URI": snapshot_uri,
        "AIRFLOW__FLARE__DASHBOARD_AWS_CONN_ID": AWS_CONN_ID,
        "GRPC_VERBOSITY": "ERROR",
    })
    try:
        s3.client().create_bucket(Bucket=bucket)
        airflow = AirflowHome(home, env, passwords, snapshot_uri, s3, bucket)
        airflow.cli("db", "migrate")
        yield airflow
    finally:
        s3.stop()


@pytest.fixture(scope="module")
def server(airflow_home, request) -> Server:
    port = free_port()
    log_path = airflow_home.path / "api-server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "airflow", "api-server", "-H", "127.0.0.1", "-p", str(port), "-w", "1"],
            env=airflow_home.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its workers go with it when it is stopped
            # Not the repository root: its *.egg-info would list the package's plugin entry point twice.
            cwd=airflow_home.path,
        )
    server = Server(f"http://127.0.0.1:{port}", airflow_home, process, log_path)
    try:
        request.getfixturevalue("federation")  # comes up while the api-server starts
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"api-server exited with {process.returncode}:\n{server.log_tail()}"
            try:
                if httpx.get(f"{server.url}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"api-server did not answer in {START_TIMEOUT_S} s:\n{server.log_tail()}"
            time.sleep(0.5)
        yield server
    finally:
        stop_group(process)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, airflow_home):
    fed = prepare(tmp_path_factory.mktemp("poc"), "clinics", 3)
    fed.set_site_settings(SHARING_SITE, share_local_model=True)
    try:
        fed.start_agents()
        fed.deploy_app(APP)
        connections = json.loads(fed.connections_file.read_text())
        connections[AWS_CONN_ID] = {
            "conn_type": "aws",
            "login": TEST_KEYS["aws_access_key_id"],
            "password": TEST_KEYS["aws_secret_access_key"],
            "extra": json.dumps({"endpoint_url": airflow_home.s3.endpoint, "region_name": TEST_KEYS["region_name"]}),
        }
        connections[BROKEN_CONN_ID] = {"conn_type": "flare", "login": "airflow-server"}  # no key, no sites
        path = airflow_home.path / "connections.json"
        path.write_text(json.dumps(connections))
        airflow_home.cli("connections", "import", str(path))
        yield fed
    finally:
        fed.stop_agents()


@pytest.fixture(scope="module")
def page_before_runs(server, federation) -> httpx.Response:
    return server.get("/flare/", server.token("admin"))


@pytest.fixture(scope="module")
def trained(airflow_home, federation, page_before_runs) -> None:
    """Two runs of the weekly DAG: every site in the first, site-3 down in the second."""
    dag = TRAIN_DAG.format(dag_id=DAG_ID, conn_id=federation.conn_id, snapshot_uri=airflow_home.snapshot_uri, aws_conn_id=AWS_CONN_ID)
    (airflow_home.path / "dags" / f"{DAG_ID}.py").write_text(dag)
    airflow_home.cli("dags", "test", DAG_ID)
    federation.agent(DOWN_SITE).stop()
    airflow_home.cli("dags", "test", DAG_ID)

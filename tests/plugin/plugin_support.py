"""The pieces of the Federation page tests: an Airflow home with its own settings, its
api-server, and the training DAG (imported by name; conftest modules cannot be)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
from s3_server import MotoServer  # tests/ is on sys.path

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "examples" / "apps" / "digits"
USERS = {"admin": "admin", "viewer": "viewer"}  # user name: SimpleAuthManager role
DAG_ID = "clinics_weekly"
DOWN_SITE = "site-3"
SHARING_SITE = "site-1"  # lets its local model be evaluated by the other sites (site.yaml share_local_model)
AWS_CONN_ID = "aws_snapshots"
BROKEN_CONN_ID = "flare_broken"
START_TIMEOUT_S = 120
CLI_TIMEOUT_S = 300

TRAIN_DAG = """
import pendulum
from airflow.sdk import DAG
from flare_provider.operators import CrossSiteEvalOperator, ScatterGatherOperator

with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False) as dag:
    train = ScatterGatherOperator(
        task_id="train",
        app_name="digits",
        flare_conn_id="{conn_id}",
        num_rounds=2,
        min_clients=2,
        wait_time_after_min_received=60,  # all three sites in the first run, even on a busy machine
        initial_model="previous",
        evaluate=False,
        snapshot_uri="{snapshot_uri}",
        aws_conn_id="{aws_conn_id}",
    )
    train >> CrossSiteEvalOperator(task_id="cross_site", app_name="digits", flare_conn_id="{conn_id}",
                                   snapshot_uri="{snapshot_uri}", aws_conn_id="{aws_conn_id}", connect_grace=2)
"""


@dataclass
class AirflowHome:
    path: Path
    env: dict[str, str]
    passwords: dict[str, str]
    snapshot_uri: str
    s3: MotoServer
    bucket: str

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert out.returncode == 0, f"airflow {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout


@dataclass
class Server:
    url: str
    home: AirflowHome
    process: subprocess.Popen
    log_path: Path

    def token(self, user: str) -> str:
        """A JWT from the auth manager's token endpoint, as API clients get one."""
        response = httpx.post(
            f"{self.url}/auth/token", json={"username": user, "password": self.home.passwords[user]}, timeout=30
        )
        assert response.status_code == 201, response.text
        return response.json()["access_token"]

    def get(self, path: str, token: str | None = None, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=60, **kwargs)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group this fixture started, SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)

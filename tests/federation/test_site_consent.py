"""What a site accepts, through real agents (mutual TLS on loopback) and real Airflow runs.

- custom code: a version not on a site's allow-list is refused, and one held for approval
  waits, both with the site's reason in the deploy task's failure; ``flare approve`` at
  the site then lets the held version deploy and train;
- requirements: a task of an app whose requirements the site's environment lacks is
  refused, naming each one;
- data: ``check_data`` stops a run whose sites' schemas differ before anything trains,
  and a passed check is not asked again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from flare_provider.client import AgentError, load_caller_kit
from flare_provider.federation.data_check import RECORD_FILE, RECORD_FOLDER, ensure_data_checked
from flare_provider.federation.records import RunSpec
from flare_provider.federation.scatter_gather import ScatterGatherRun
from flare_provider.poc import prepare
from flare_provider.snapshots import SnapshotStore
from flare_provider.snapshots.naming import encode_name
from flare_provider.wire.bundles import build_bundle
from flare_provider.wire.tensors import save_file

HELD, LISTED = "site-1", "site-2"  # site-1 holds new versions for approval; site-2 runs listed versions only
OTHER_VERSION = "0" * 64
# site-2's tasks run in a named interpreter (site.yaml python): this environment's, by another path
WORKER_PYTHON = Path(sys.executable).with_name("python3" if Path(sys.executable).name != "python3" else "python")
PLUS_ONE = '''\
from site_agent.trainer import Trainer, TrainResult


class PlusOne(Trainer):
    def train(self, weights, ctx):
        return TrainResult({name: value + 1 for name, value in weights.items()}, num_samples=3)
'''
DIGITS_APP = """\
name: {name}
trainer:
  path: site_agent.trainers.pytorch.ClassifierTrainer
  args:
    model: [{{layer: Linear, in_features: 64, out_features: 10}}]
    epochs: 1
{extra}"""
DEPLOY_DAG = """\
import pendulum
from airflow.sdk import DAG
from flare_provider.operators import DeployAppOperator

with DAG({dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False) as dag:
    DeployAppOperator(task_id="deploy", app_dir={app!r}, sites={sites!r}, flare_conn_id={conn!r})
"""
TRAIN_DAG = """\
import pendulum
from airflow.sdk import DAG
from flare_provider.operators import ScatterGatherOperator

with DAG({dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False) as dag:
    ScatterGatherOperator(task_id="train", app_name="digits", num_rounds=1, flare_conn_id={conn!r}, evaluate=False,
                          snapshot_uri={snapshots!r}, check_data={{"schema": "equal", "min_samples": 20}})
"""


@pytest.fixture(scope="module")
def fed(tmp_path_factory, airflow_db):
    federation = prepare(tmp_path_factory.mktemp("consent"), f"consent_{uuid.uuid4().hex[:6]}", 2, connect="listen")
    federation.set_site_settings(HELD, custom_code={"require_approval": True}, preload_modules=[])
    federation.set_site_settings(LISTED, custom_code={"allow": [{"app": "plus_one", "version": OTHER_VERSION}]},
                                 preload_modules=[], python=str(WORKER_PYTHON))
    env_var = f"AIRFLOW_CONN_{federation.conn_id.upper()}"
    os.environ[env_var] = federation.connection_json()
    try:
        federation.start_agents()
        yield federation
    finally:
        os.environ.pop(env_var, None)
        federation.stop_agents()


@pytest.fixture
def task_log(capfd, caplog):
    caplog.set_level(logging.INFO)

    def read() -> str:
        text = capfd.readouterr().out + "\n" + caplog.text
        caplog.clear()
        return text

    return read


def write_app(folder, name: str, custom: str | None = None, extra: str = ""):
    folder.mkdir(parents=True)
    if custom is None:
        (folder / "app.yaml").write_text(DIGITS_APP.format(name=name, extra=extra))
    else:
        (folder / "app.yaml").write_text(f"name: {name}\ntrainer:\n  path: plus_one.PlusOne\n{extra}")
        (folder / "custom").mkdir()
        (folder / "custom" / "plus_one.py").write_text(custom)
    return folder


def flare_approve(fed, site: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flare_provider.cli", "approve", *args, "--kit", str(fed.kits[site])],
                          capture_output=True, text=True, timeout=60)


def test_custom_code_refused_or_held_until_approved_at_the_site(fed, run_dag, task_log, tmp_path):
    app = write_app(tmp_path / "plus_one", "plus_one", custom=PLUS_ONE)
    weights = tmp_path / "w.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, weights)

    dag_run = run_dag(DEPLOY_DAG.format(dag_id="consent_deploy_both", app=str(app), sites=[HELD, LISTED], conn=fed.conn_id),
                      "consent_deploy_both")
    log = task_log()
    assert dag_run.state == "failed"
    version = re.search(r"app 'plus_one' version ([0-9a-f]{64})", log).group(1)
    assert f"{LISTED}: app 'plus_one' version {version}: the site will not run it: " in log
    assert "not in custom_code.allow of its local/site.yaml" in log
    assert f"{HELD}: app 'plus_one' version {version} is held until approved at the site" in log
    assert f"flare approve plus_one --version {version}" in log

    # A task for the held version says why, at once.
    with fed.client(HELD) as client:
        with pytest.raises(AgentError) as refused:
            client.submit_task("consent-early", "plus_one", weights, 1, app_version=version)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "waits for approval" in refused.value.details

    # What an operator sees from the Airflow side: the held version marked in `flare status`.
    status = subprocess.run([sys.executable, "-m", "flare_provider.cli", "status", "--kit", str(fed.server_kit)],
                            capture_output=True, text=True, timeout=60)
    rows = {line.split()[0]: line for line in status.stdout.splitlines() if line.split()[:1] in ([HELD], [LISTED])}
    assert f"plus_one@{version[:12]} (pending)" in rows[HELD], status.stdout
    assert f"plus_one@{version[:12]} (refused)" in rows[LISTED], status.stdout

    listing = flare_approve(fed, HELD, "--list")
    assert listing.returncode == 0, listing.stderr
    assert re.search(rf"^pending\s+plus_one\s+{version}\s+airflow-server", listing.stdout, re.M), listing.stdout
    approved = flare_approve(fed, HELD, "plus_one", "--version", version[:16], "--by", "site-it")
    assert approved.returncode == 0, approved.stderr
    assert f"version:      {version}" in approved.stdout
    assert re.search(r"^\s+\d+\s+custom/plus_one\.py$", approved.stdout, re.M)  # its files, with their sizes
    assert "approved by site-it" in approved.stdout and "run from now on" in approved.stdout

    dag_run = run_dag(DEPLOY_DAG.format(dag_id="consent_deploy_held", app=str(app), sites=[HELD], conn=fed.conn_id),
                      "consent_deploy_held")
    assert dag_run.state == "success", task_log()[-3000:]
    with fed.client(HELD) as client:
        state, created = client.submit_task("consent-approved", "plus_one", weights, 1, app_version=version)
        assert created
        for state in client.watch_task("consent-approved", timeout=60):
            pass
        assert state.status == "succeeded", state.error
        (info,) = [a for a in client.status().apps if a.name == "plus_one"]
        assert (info.consent_status, info.runnable) == ("allowed", True)
    with fed.client(LISTED) as client:  # still refused where it is not listed
        with pytest.raises(AgentError) as refused:
            client.submit_task("consent-unlisted", "plus_one", weights, 1, app_version=version)
        assert "not in custom_code.allow" in refused.value.details


def test_task_refused_naming_the_requirements_the_site_lacks(fed, tmp_path):
    extra = "requirements: ['flare-test-absent-package>=1.0', 'numpy>=1.0', 'numpy>=9999', \"absent-on-py3; python_version < '3'\"]\n"
    app = write_app(tmp_path / "needs", "needs_packages", extra=extra)
    kit = load_caller_kit(fed.server_kit)
    bundle = build_bundle(app, kit.cert_pem, kit.key_pem)
    save_file({}, tmp_path / "empty.safetensors")
    found = np.__version__
    for site in fed.sites:  # the agent's own interpreter; site-2's named one (asked in a process of its own)
        with kit.client(site) as client:
            info, _ = client.deploy_app(bundle)
            assert info.consent_status == "allowed"  # no custom code
            assert info.missing_requirements == ("flare-test-absent-package>=1.0 (not installed)", f"numpy>=9999 (found {found})")
            with pytest.raises(AgentError) as refused:
                client.submit_task("needs-1", "needs_packages", tmp_path / "empty.safetensors", 1)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        details = refused.value.details
        assert "flare-test-absent-package>=1.0 (not installed)" in details and f"numpy>=9999 (found {found})" in details
        assert "numpy>=1.0," not in details and "absent-on-py3" not in details
    assert str(WORKER_PYTHON) in details


def test_schema_mismatch_stops_the_run_before_any_training(fed, run_dag, task_log, tmp_path):
    fed.deploy_app(write_app(tmp_path / "digits", "digits"))
    with np.load(fed.data_dir(LISTED) / "train.npz") as npz:
        x, y = npz["x"], npz["y"]
    np.savez(fed.data_dir(LISTED) / "train.npz", x=x[:, :63], y=y)  # one feature short
    before = {site: fed.agent(site).log_path.stat().st_size for site in fed.sites}
    try:
        snapshots = (tmp_path / "snapshots").as_uri()
        dag_run = run_dag(TRAIN_DAG.format(dag_id="consent_schema", conn=fed.conn_id, snapshots=snapshots), "consent_schema")
        log = task_log()
        assert dag_run.state == "failed"
        assert f"{LISTED}: schema differs from {HELD}'s: x.shape is [63] where expected [64]" in log
        assert "nothing was trained" in log
        for site in fed.sites:  # only the describe tasks ran: no training, not even an initial model
            started = re.findall(r"task (\S+) running in process", fed.agent(site).log_path.read_text()[before[site]:])
            assert len(started) == 1 and started[0].endswith("-describe"), started
        record = SnapshotStore(snapshots).backend.get_bytes(
            f"{encode_name('consent_schema')}/{encode_name(dag_run.run_id)}/{RECORD_FOLDER}/{RECORD_FILE}")
        assert json.loads(record)["passed"] is False
        assert SnapshotStore(snapshots).list_rounds("consent_schema", dag_run.run_id) == []
    finally:
        np.savez(fed.data_dir(LISTED) / "train.npz", x=x, y=y)


def test_a_passed_data_check_is_not_asked_again(fed, tmp_path):
    spec = RunSpec(federation="consent_check", run_id="once", app_name="digits", sites=fed.sites, num_rounds=1, min_clients=2)
    store = SnapshotStore((tmp_path / "snapshots").as_uri())
    check = {"schema": "equal", "min_samples": 20}
    with ScatterGatherRun(spec, load_caller_kit(fed.server_kit), store) as run:
        record = ensure_data_checked(run, check)
    assert record["passed"] and set(record["sites"]) == set(fed.sites)
    assert record["sites"][HELD]["schema"] == {"x": {"shape": [64], "dtype": "float32"}, "y": {"shape": [], "dtype": "int64"}}
    describes = {site: fed.agent(site).log_path.read_text().count(f"{spec.task_id(0, site, 'describe')} running") for site in fed.sites}
    assert describes == {site: 1 for site in fed.sites}
    with ScatterGatherRun(spec, load_caller_kit(fed.server_kit), store) as run:  # a retry of the task
        assert ensure_data_checked(run, check) == record
    again = {site: fed.agent(site).log_path.read_text().count(f"{spec.task_id(0, site, 'describe')} running") for site in fed.sites}
    assert again == describes

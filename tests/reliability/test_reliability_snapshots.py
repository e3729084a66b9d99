"""The snapshot store failing a run, through the operator in real Airflow runs (``dag.test()``).

- The S3 endpoint dies at the moment round 2's commit marker is written (a proxy in front
  of a real moto server cuts every connection and refuses new ones): bounded retries with
  backoff, then a task failure naming the store; round 2 is never visible; once the
  endpoint is back, a retry of the task resumes after round 1, re-attaches to the sites'
  round-2 results and finishes, nothing trained twice.
- The newest committed round's model file is overwritten: the retry detects it, resumes
  from the round before and completes the run.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import numpy as np
import pytest
from reliability_support import LIVE_SITES, AgentLogs, CuttingProxy, TcpProxy, dag_file, task_instance
from s3_server import TEST_KEYS, MotoServer

from flare_provider.snapshots import SnapshotStore
from flare_provider.snapshots.local import path_from_file_uri
from flare_provider.wire.tensors import save_file

AWS_CONN_ID = "aws_reliability"
COMMIT_OF_ROUND_2 = re.compile(rb"^PUT \S*/round_00002/COMMIT ")


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture
def proxies():
    """Proxies a test starts, all stopped at its end."""
    started: list[TcpProxy] = []
    yield started
    for proxy in started:
        proxy.stop()


def aws_connection(endpoint: str) -> str:
    extra = {"endpoint_url": endpoint, "region_name": TEST_KEYS["region_name"]}
    return json.dumps({"conn_type": "aws", "login": TEST_KEYS["aws_access_key_id"],
                       "password": TEST_KEYS["aws_secret_access_key"], "extra": extra})


def training_dag(fed, dag_id: str, initial_model: str, snapshot_uri: str, **arguments) -> str:
    return dag_file(dag_id, {"train": dict(
        app_name="digits", flare_conn_id=fed.conn_id, sites=list(LIVE_SITES), num_rounds=2, initial_model=initial_model,
        train_config={"epochs": 1}, snapshot_uri=snapshot_uri, evaluate=False, **arguments,
    )})


def test_s3_down_at_commit_fails_the_task_then_a_retry_resumes(fed, digits_initial, moto, proxies, run_dag, task_log,
                                                               measured, monkeypatch):
    bucket = f"snapshots-{uuid.uuid4().hex[:8]}"
    moto.client().create_bucket(Bucket=bucket)
    proxies.append(CuttingProxy(moto.port, COMMIT_OF_ROUND_2))
    cutter = proxies[0]
    monkeypatch.setenv(f"AIRFLOW_CONN_{AWS_CONN_ID.upper()}", aws_connection(cutter.endpoint))
    dag_id, when = "s3_down", "2026-11-03T00:00:00+00:00"
    source = training_dag(fed, dag_id, digits_initial, f"s3://{bucket}/snapshots", aws_conn_id=AWS_CONN_ID)
    logs = AgentLogs(fed, LIVE_SITES)

    first = run_dag(source, dag_id, logical_date=when)
    failed_after = time.monotonic() - (cutter.cut_at or 0)
    log = task_log()
    assert cutter.cut_at is not None, "round 2 was never committed"
    assert first.state == "failed" and task_instance(first, "train").state == "failed"
    commit_key = f"s3://{bucket}/snapshots/{dag_id}/"
    assert re.search(rf"SnapshotError: {re.escape(commit_key)}\S+/round_00002/COMMIT: cannot write after 4 attempts: "
                     r"Could not connect to the endpoint URL", log), log[-5000:]
    for attempt in (1, 2, 3):
        warning = rf"S3 write of {re.escape(commit_key)}\S+/round_00002/COMMIT failed .*; retry {attempt} of 3 in"
        assert re.search(warning, log), attempt
    assert failed_after < 60, f"the task failed {failed_after:.0f} s after the endpoint went down"
    measured(f"S3 endpoint down at round 2's commit: the task failed {failed_after:.1f} s later")
    assert TEST_KEYS["aws_secret_access_key"] not in log

    # Round 2's files reached the server, its commit marker did not: nobody sees round 2.
    store = SnapshotStore(f"s3://{bucket}/snapshots", s3_client=moto.client())
    keys = store.backend.list_keys("")
    assert any(k.endswith("round_00002/model.safetensors") for k in keys)
    assert not any(k.endswith("round_00002/COMMIT") for k in keys)
    assert store.list_rounds(dag_id, first.run_id) == [0, 1]
    assert store.latest(dag_id, first.run_id).round == 1

    proxies.append(TcpProxy(moto.port, cutter.port))  # the endpoint is back
    retry = run_dag(source, dag_id, logical_date=when)
    log = task_log()
    assert retry.state == "success", log[-5000:]
    assert retry.run_id == first.run_id
    assert f"Resuming {dag_id} run {first.run_id} after committed round 1" in log
    history = store.latest(dag_id, first.run_id).state["history"]
    assert [h["round"] for h in history] == [1, 2]
    assert all(history[1]["sites"][site]["reattached"] for site in LIVE_SITES)  # their results were kept
    for site in LIVE_SITES:
        tasks = logs.started(site)
        assert len(tasks) == 2 and all(len(pids) == 1 for pids in tasks.values()), tasks  # nothing trained twice


def test_corrupted_newest_snapshot_is_skipped_and_the_run_completes(fed, digits_initial, run_dag, tmp_path, task_log):
    snapshots = (tmp_path / "snapshots").as_uri()
    dag_id, when = "corrupted_snapshot", "2026-11-04T00:00:00+00:00"
    source = training_dag(fed, dag_id, digits_initial, snapshots, train_timeout=45.0)
    first = run_dag(source, dag_id, logical_date=when)
    assert first.state == "success", task_log()[-5000:]
    task_log()

    store = SnapshotStore(snapshots)
    newest = store.latest(dag_id, first.run_id)
    assert newest.round == 2
    model = store.load_weights(newest)
    # A valid safetensors file of the right layout, but not the committed model: only its checksum tells.
    save_file({name: np.zeros_like(value) for name, value in model.items()}, path_from_file_uri(newest.model_uri))

    retry = run_dag(source, dag_id, logical_date=when)
    log = task_log()
    assert retry.state == "success", log[-5000:]
    skipped = r"skipping snapshot: \S+/round_00002: model\.safetensors (does not match its SHA-256|is \d+ bytes)"
    assert re.search(skipped, log), log[-5000:]
    assert f"Resuming {dag_id} run {first.run_id} after committed round 1" in log
    latest = store.latest(dag_id, first.run_id)
    assert latest.round == 2 and [h["round"] for h in latest.state["history"]] == [1, 2]
    assert store.find_final(dag_id, first.run_id).round == 2
    # Round 2 trained again from the same round 1: the model the run had before the damage.
    redone = store.load_weights(latest)
    assert all(np.array_equal(redone[name], value) for name, value in model.items())

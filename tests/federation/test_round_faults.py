"""Rounds under faults, with real agents: a site dying mid-round, too few sites, a worker
killed mid-round and retried (nothing trained twice)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from fed_support import trainings

from flare_provider.client import load_caller_kit
from flare_provider.federation.errors import RoundFailed
from flare_provider.federation.records import RunSpec
from flare_provider.federation.scatter_gather import ScatterGatherRun
from flare_provider.snapshots import SnapshotStore

APP = Path(__file__).resolve().parents[2] / "examples" / "apps" / "digits"


@pytest.fixture(scope="module")
def fed(digits_federation):
    digits_federation.deploy_app(APP)
    return digits_federation


def make_run(fed, tmp_path, **overrides) -> ScatterGatherRun:
    spec = dict(federation="faults", run_id=uuid.uuid4().hex, app_name="digits", sites=fed.sites, num_rounds=2,
                min_clients=2, wait_time_after_min_received=1.0, train_timeout=120.0)
    spec.update(overrides)
    return ScatterGatherRun(RunSpec(**spec), load_caller_kit(fed.server_kit), SnapshotStore(f"file://{tmp_path}/snapshots"))


def test_site_killed_mid_round_round_completes_and_site_rejoins(fed, tmp_path):
    with make_run(fed, tmp_path) as run:
        progress = run.restore()
        flight = run.scatter(progress)
        fed.agent("site-3").kill()  # its training is under way
        progress = run.finish_round(progress, flight, run.gather(flight))
        first = progress.history[-1]
        assert first.accepted == ["site-1", "site-2"]
        assert "site-3" in first.dropped
    run_id = run.spec.run_id

    fed.agent("site-3").start()
    # The next round (a resumed run, waiting long enough for every site) has site-3 back.
    with make_run(fed, tmp_path, run_id=run_id, wait_time_after_min_received=60.0) as run:
        progress = run.restore()
        assert progress.round == 1
        flight = run.scatter(progress)
        progress = run.finish_round(progress, flight, run.gather(flight))
        assert progress.history[-1].accepted == ["site-1", "site-2", "site-3"], progress.history[-1].dropped
    assert run.store.latest("faults", run_id).round == 2


def test_too_few_sites_fail_the_round_clearly(fed, tmp_path):
    fed.agent("site-2").kill()
    fed.agent("site-3").kill()
    try:
        with make_run(fed, tmp_path) as run:
            progress = run.restore()
            with pytest.raises(RoundFailed) as excinfo:
                run.scatter(progress)
        message = str(excinfo.value)
        assert "round 1: only 1 of 3 sites took the task, min_clients is 2" in message
        assert "site-2: submit failed" in message and "site-3: submit failed" in message
        assert run.store.latest("faults", run.spec.run_id).round == 0  # nothing committed but the initial model
    finally:
        fed.agent("site-2").start(wait=False)
        fed.agent("site-3").start(wait=False)
        fed.agent("site-2").wait_ready()
        fed.agent("site-3").wait_ready()


RESUME_DAG = """
import pendulum
from airflow.sdk import DAG
from flare_provider.operators import ScatterGatherOperator

with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False) as dag:
    ScatterGatherOperator(task_id="train", app_name="digits", flare_conn_id="{conn}", num_rounds=3,
                          snapshot_uri="file://{snapshots}", evaluate=False)
"""

RUN_ONCE = """
import importlib.util, sys, pendulum
spec = importlib.util.spec_from_file_location("dagfile", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
when = pendulum.parse(sys.argv[2])
module.dag.test(logical_date=when, run_after=when)
"""


def test_worker_killed_mid_round_resumes_without_training_twice(fed, run_dag, airflow_db, tmp_path):
    dag_id = f"resume_{uuid.uuid4().hex[:6]}"
    source = RESUME_DAG.format(dag_id=dag_id, conn=fed.conn_id, snapshots=tmp_path / "snapshots")
    dag_file = airflow_db / "dags" / f"{dag_id}.py"
    dag_file.parent.mkdir(exist_ok=True)
    dag_file.write_text(source)
    logical_date = "2026-11-02T00:00:00+00:00"
    before = {site: set(trainings(fed, site)) for site in fed.sites}

    def new_trainings(round_tag: str) -> int:
        return sum(1 for s in fed.sites for t in set(trainings(fed, s)) - before[s] if round_tag in t)

    worker = subprocess.Popen([sys.executable, "-c", RUN_ONCE, str(dag_file), logical_date],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 180
        while new_trainings("-r0002-") < 3:  # round 1 committed, round 2 training everywhere
            assert worker.poll() is None, "the worker ended before round 2 started"
            assert time.monotonic() < deadline, "round 2 never started"
            time.sleep(0.2)
        worker.send_signal(signal.SIGKILL)  # the worker dies mid-round
        worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()

    # Airflow's retry: the same DAG run again, in a new process (this one).
    dag_run = run_dag(source, dag_id, logical_date=logical_date)
    assert dag_run.state == "success"

    counts = {site: {t: n for t, n in trainings(fed, site).items() if t not in before[site]} for site in fed.sites}
    assert sum(len(c) for c in counts.values()) == 3 * 3  # rounds x sites
    assert all(n == 1 for c in counts.values() for n in c.values()), counts  # nothing trained twice

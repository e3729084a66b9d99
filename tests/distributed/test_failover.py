"""Failover in a distributed Airflow: Celery executor, PostgreSQL, Redis, real agents, S3.

- A Celery worker is SIGKILLed in the middle of a round. The scheduler notices the missing
  heartbeats, the task is retried on the other worker, resumes after the last committed
  round and re-attaches to the sites' tasks of the round that was in flight.
- The triggerer is SIGKILLed while a deferred round waits in its trigger. A new triggerer
  takes the trigger over and the run completes.

Either way no site trains anything twice, and the final model is bit-identical to the one
of an uninterrupted run of the same DAG. Afterwards no log of any component or task holds
a key or password. Run with ``-s`` to see the recovery times.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from fed_support import trainings  # tests/federation, put on sys.path by conftest
from harness import AWS_CONN_ID, wait_for
from s3_server import TEST_KEYS

from flare_provider.federation.records import RunSpec

ROUNDS = 3
KILL_ROUND = 2
DAG_ID = "fl_train"
DEFERRED_DAG_ID = "fl_train_deferred"
RUN_TIMEOUT = 240.0
ROUND_TIMEOUT = 120.0

# The app fixes every seed (model init, data shuffling), so runs of this DAG differ only in
# their federation name and run id; a run's federation comes from the trigger's conf.
# Digits rounds train in milliseconds; the round the tests interrupt trains long enough
# (seconds) that it is still in flight when the test has seen it start.
TRAINING_DAG = """
from datetime import timedelta

import pendulum
from airflow.sdk import DAG
from flare_provider.operators import ScatterGatherOperator

with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False,
         params={{"federation": "{dag_id}"}}) as dag:
    ScatterGatherOperator(
        task_id="train",
        app_name="digits",
        flare_conn_id="{conn}",
        federation="{{{{ params.federation }}}}",
        num_rounds={rounds},
        min_clients=3,
        snapshot_uri="{snapshot_uri}",
        aws_conn_id="{aws_conn_id}",
        evaluate=False,
        round_configs={{{kill_round}: {{"epochs": 300}}}},
        deferrable={deferrable},
        poll_interval=0.5,
        retries=2,
        retry_delay=timedelta(seconds=1),
    )
"""


@pytest.fixture(scope="module")
def dags(cluster):
    cluster.write_dags({
        dag_id: TRAINING_DAG.format(dag_id=dag_id, conn=cluster.conn_id, rounds=ROUNDS, kill_round=KILL_ROUND,
                                    snapshot_uri=cluster.snapshot_uri,
                                    aws_conn_id=AWS_CONN_ID, deferrable=deferrable)
        for dag_id, deferrable in ((DAG_ID, False), (DEFERRED_DAG_ID, True))
    })
    return cluster


def run_spec(cluster, federation: str, run_id: str) -> RunSpec:
    """The run as the operator sees it: what its task ids at the sites are."""
    return RunSpec(federation=federation, run_id=run_id, app_name="digits", sites=cluster.federation.sites,
                   num_rounds=ROUNDS, min_clients=3)


def site_trainings(cluster, spec: RunSpec) -> dict[str, int]:
    """How often each training task of this run was started, over all sites (agent logs)."""
    fed = cluster.federation
    return {task: n for site in fed.sites for task, n in trainings(fed, site).items() if task.startswith(spec.run_key)}


def assert_trained_once(cluster, spec: RunSpec) -> None:
    expected = {spec.task_id(r, site): 1 for r in range(1, ROUNDS + 1) for site in spec.sites}
    assert site_trainings(cluster, spec) == expected  # rounds x sites trainings, none repeated


def wait_until_training(cluster, spec: RunSpec, round_number: int) -> None:
    """Until every site has started its training of ``round_number``."""
    wanted = {site: spec.task_id(round_number, site) for site in spec.sites}
    wait_for(f"round {round_number} training at every site",
             lambda: all(wanted[s] in trainings(cluster.federation, s) for s in spec.sites), ROUND_TIMEOUT,
             interval=0.1, details=cluster.diagnostics)


def committed_round(cluster, spec: RunSpec) -> int:
    latest = cluster.store().latest(spec.federation, spec.run_id)
    return latest.round if latest else 0


def final_weights(cluster, spec: RunSpec) -> dict[str, np.ndarray]:
    store = cluster.store()
    snapshot = store.latest(spec.federation, spec.run_id)
    assert snapshot is not None and snapshot.round == ROUNDS
    return store.load_weights(snapshot)


def assert_same_model(weights: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    assert weights.keys() == reference.keys()
    for name in reference:
        assert weights[name].dtype == reference[name].dtype and np.array_equal(weights[name], reference[name]), name


def print_timeline(title: str, start: float, marks: dict[str, float]) -> None:
    print(f"\n{title}:")
    for what, when in sorted(marks.items(), key=lambda item: item[1]):
        print(f"  +{when - start:6.1f} s  {what}")


def first_log_line(cluster, dag_id: str, run_id: str, pattern: str, after: float, text: str = "") -> float:
    """When the task's log (files matching ``pattern``) first had a line with ``text`` after ``after``."""
    times = [t for t, event in cluster.task_log(dag_id, run_id, "train", pattern) if t > after and text in event]
    assert times, f"no log line with {text!r} in {dag_id}/{run_id} {pattern}"
    return times[0]


def triggerer_heartbeat(cluster) -> float:
    """When the newest triggerer last heartbeat (epoch seconds), per the api-server."""
    from datetime import datetime

    latest = cluster.api.health()["triggerer"].get("latest_triggerer_heartbeat")
    return datetime.fromisoformat(latest).timestamp() if latest else 0.0


@pytest.fixture(scope="module")
def reference(dags):
    """An uninterrupted run of the same DAG: the model the interrupted runs must end with."""
    cluster = dags
    spec = run_spec(cluster, "fl_reference", f"reference-{uuid.uuid4().hex[:8]}")
    started = time.time()
    cluster.api.trigger(DAG_ID, spec.run_id, {"federation": spec.federation})
    run = cluster.wait_for_run(DAG_ID, spec.run_id, RUN_TIMEOUT)
    assert run["state"] == "success", cluster.diagnostics()
    print(f"\nuninterrupted run of {ROUNDS} rounds: {time.time() - started:.1f} s from trigger to success")
    assert_trained_once(cluster, spec)
    return final_weights(cluster, spec)


def test_worker_killed_mid_round_is_retried_on_the_other_worker(dags, reference):
    cluster = dags
    spec = run_spec(cluster, "fl_worker_failover", f"failover-{uuid.uuid4().hex[:8]}")
    cluster.api.trigger(DAG_ID, spec.run_id, {"federation": spec.federation})

    def task() -> dict:
        return cluster.api.task_instance(DAG_ID, spec.run_id, "train")

    wait_until_training(cluster, spec, KILL_ROUND)
    first = task()
    assert (first["state"], first["try_number"]) == ("running", 1)
    victim = cluster.worker_running(first["pid"])
    (survivor,) = [w for w in cluster.workers if w is not victim]
    assert committed_round(cluster, spec) == KILL_ROUND - 1  # the round is in flight, not committed

    killed_at = time.time()
    victim.kill()  # the worker, its pool process and the task process, all at once
    marks = {}
    try:
        wait_for("the scheduler noticing the dead task", lambda: (ti := task())["state"] != "running" or ti["try_number"] > 1,
                 60, details=cluster.diagnostics)
        marks["heartbeat timeout noticed: try 1 no longer running"] = time.time()
        retry = wait_for("the retry running",
                         lambda: (ti := task())["state"] == "running" and ti["try_number"] == 2 and ti, 60,
                         details=cluster.diagnostics)
        marks["try 2 running"] = time.time()
        assert cluster.worker_running(retry["pid"]) is survivor
        victim.start()  # back to two workers while the run goes on
        wait_for(f"round {KILL_ROUND} committed", lambda: committed_round(cluster, spec) >= KILL_ROUND, ROUND_TIMEOUT,
                 details=cluster.diagnostics)
        marks[f"round {KILL_ROUND} committed: progress resumed"] = time.time()
        run = cluster.wait_for_run(DAG_ID, spec.run_id, RUN_TIMEOUT)
        marks["run succeeded"] = time.time()
    finally:
        if not victim.alive:
            victim.start()
        victim.wait_ready()
    marks["retry's first log line"] = first_log_line(cluster, DAG_ID, spec.run_id, "attempt=2.log", killed_at)
    marks[f"retry resumed after committed round {KILL_ROUND - 1}"] = first_log_line(
        cluster, DAG_ID, spec.run_id, "attempt=2.log", killed_at, f"after committed round {KILL_ROUND - 1} ")
    print_timeline(f"worker {victim.name} SIGKILLed in round {KILL_ROUND}, retried on {survivor.name}", killed_at, marks)

    assert run["state"] == "success", cluster.diagnostics()
    assert task()["try_number"] == 2
    assert_trained_once(cluster, spec)
    history = cluster.store().latest(spec.federation, spec.run_id).state["history"]
    resumed = history[KILL_ROUND - 1]["sites"]
    assert all(resumed[site]["reattached"] for site in spec.sites), resumed  # took up the sites' tasks
    assert_same_model(final_weights(cluster, spec), reference)


def test_triggerer_killed_while_round_waits_new_triggerer_completes(dags, reference):
    cluster = dags
    fed = cluster.federation
    spec = run_spec(cluster, "fl_triggerer_restart", f"triggerer-{uuid.uuid4().hex[:8]}")
    cluster.api.trigger(DEFERRED_DAG_ID, spec.run_id, {"federation": spec.federation})

    def task() -> dict:
        return cluster.api.task_instance(DEFERRED_DAG_ID, spec.run_id, "train")

    def still_training() -> bool:
        """Some site of the round is not finished: the trigger cannot have fired yet."""
        ids = {site: spec.task_id(KILL_ROUND, site) for site in spec.sites}
        statuses = []
        for site in spec.sites:
            with fed.client(site) as client:
                statuses.append(client.get_task(ids[site]).terminal)
        return not all(statuses)

    wait_until_training(cluster, spec, KILL_ROUND)
    wait_for("the round waiting in the trigger", lambda: task()["state"] == "deferred", ROUND_TIMEOUT, interval=0.1,
             details=cluster.diagnostics)
    assert still_training()
    assert committed_round(cluster, spec) == KILL_ROUND - 1

    killed_at = time.time()
    cluster.triggerer.kill()
    cluster.triggerer.start()  # a new triggerer process, as a supervisor would start one
    marks = {}
    wait_for("the new triggerer heartbeating", lambda: triggerer_heartbeat(cluster) > killed_at, ROUND_TIMEOUT,
             details=cluster.diagnostics)
    marks["new triggerer heartbeating"] = time.time()
    wait_for("the trigger firing", lambda: task()["state"] != "deferred" or committed_round(cluster, spec) >= KILL_ROUND,
             ROUND_TIMEOUT, details=cluster.diagnostics)
    marks["trigger fired: task no longer deferred"] = time.time()
    wait_for(f"round {KILL_ROUND} committed", lambda: committed_round(cluster, spec) >= KILL_ROUND, ROUND_TIMEOUT,
             details=cluster.diagnostics)
    marks[f"round {KILL_ROUND} committed: progress resumed"] = time.time()
    run = cluster.wait_for_run(DEFERRED_DAG_ID, spec.run_id, RUN_TIMEOUT)
    marks["run succeeded"] = time.time()
    print_timeline(f"triggerer SIGKILLed while round {KILL_ROUND} waited in its trigger", killed_at, marks)

    assert run["state"] == "success", cluster.diagnostics()
    assert task()["try_number"] == 1  # the task itself never failed
    assert_trained_once(cluster, spec)
    assert_same_model(final_weights(cluster, spec), reference)


def test_no_key_or_password_in_any_log(cluster):
    """After the failures and retries above: no component log or task log holds a secret."""
    key_pem = next((cluster.federation.server_kit / "startup").glob("*.key")).read_text()
    key_lines = [line for line in key_pem.splitlines() if not line.startswith("-----")][1:]  # the first is a fixed prefix
    secrets = {f"server key line {i}": line for i, line in enumerate(key_lines, 2)}
    secrets["AWS secret key"] = TEST_KEYS["aws_secret_access_key"]
    for name in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
        secrets[name] = cluster.env[name]
    logs = [p for p in [*cluster.logs.iterdir(), *(cluster.home / "logs").rglob("*")] if p.is_file()]
    assert len(logs) > 10
    leaks = [(path.name, what) for path in logs for what, secret in secrets.items() if secret in path.read_text(errors="replace")]
    assert not leaks


def test_the_sites_opened_no_port_the_workers_reached_them_through_the_relay(cluster):
    """After the rounds above: each agent listens on nothing and is connected to the relay only."""
    import psutil

    relay_ports = set(cluster.federation.relay_ports.values())
    for site in cluster.federation.sites:
        agent = psutil.Process(cluster.federation.agent(site).proc.pid)
        processes = (agent, *agent.children(recursive=True))
        assert [c for p in processes for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN] == []
        assert {c.raddr.port for c in agent.net_connections(kind="tcp") if c.raddr} <= relay_ports

"""Sites that fail a run, through the operator in real Airflow runs (``dag.test()``).

- A site whose agent never started: every round drops it with the connection error in
  the task log and the round history, and the run goes on with ``min_clients``.
- A site that takes a task and never answers (custom code that sleeps for hours, deaf to
  SIGTERM, on sites that opted in to custom code): the wait ends at ``train_timeout``,
  the site is dropped with its reason, its task is aborted at the site and the worker
  process is gone; nothing waits longer than its bound.
"""

from __future__ import annotations

import json
import textwrap
import time

import numpy as np
import pytest
from reliability_support import (
    LIVE_SITES,
    SPARE_SITES,
    AgentLogs,
    dag_file,
    deploy,
    process_group_alive,
    wait_for,
)

from flare_provider.snapshots import SnapshotStore
from flare_provider.wire.tensors import save_file

TRAIN_TIMEOUT = 20.0  # seconds; the healthy site's numpy trainer needs a few
STALL_TRAINER = '''\
"""A trainer that never answers at one site: it sleeps for hours, deaf to SIGTERM.

The round config names the site (stall_site) and the task kinds it stalls in (stall_in);
everywhere else it answers at once.
"""
import signal
import time

from site_agent.trainer import EvalResult, Trainer, TrainResult


class StallAtOneSite(Trainer):
    def _stall_here(self, ctx):
        if ctx.site == ctx.config.get("stall_site") and ctx.kind in ctx.config.get("stall_in", ()):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(6 * 3600)

    def train(self, weights, ctx):
        self._stall_here(ctx)
        return TrainResult({name: value + 1 for name, value in weights.items()}, num_samples=10)

    def evaluate(self, weights, ctx):
        self._stall_here(ctx)
        return EvalResult({"score": 1.0}, num_samples=10)
'''


def test_unreachable_site_is_dropped_with_its_error_and_the_run_goes_on(fed, digits_initial, run_dag, xcom, tmp_path,
                                                                         task_log):
    down = SPARE_SITES[0]  # provisioned, in the connection, its agent never started
    snapshots = (tmp_path / "snapshots").as_uri()
    source = dag_file("unreachable_site", {"train": dict(
        app_name="digits", flare_conn_id=fed.conn_id, sites=[*LIVE_SITES, down], min_clients=2, num_rounds=2,
        initial_model=digits_initial, train_config={"epochs": 1}, snapshot_uri=snapshots, evaluate=False,
        connect_grace=1,  # a down site is retried for a second per round, not the default ten
    )})
    dag_run = run_dag(source, "unreachable_site")
    log = task_log()
    assert dag_run.state == "success", log[-5000:]

    result = xcom(dag_run, "train")
    assert result["rounds_done"] == 2
    history = SnapshotStore(snapshots).latest("unreachable_site", dag_run.run_id).state["history"]
    assert [h["round"] for h in history] == [1, 2]
    for record in history:
        assert record["accepted"] == list(LIVE_SITES)
        error = record["dropped"][down]
        assert error.startswith(f"submit failed: site {down!r}: SubmitTask failed: UNAVAILABLE"), error
        assert f"127.0.0.1:{fed.ports[down]}" in error and "Connection refused" in error
        assert (record["sites"][down]["status"], record["sites"][down]["error"]) == ("dropped", error)
        assert record["sites"][down]["num_samples"] == 0
        assert f"Round {record['round']}: site {down} dropped: site {down!r}: SubmitTask failed: UNAVAILABLE" in log
    assert "PRIVATE KEY" not in log and "PRIVATE KEY" not in json.dumps(result)


@pytest.fixture(scope="module")
def stall_app(fed, tmp_path_factory):
    """The stalling app, deployed to the live sites after they opted in to custom code
    (``allow_custom_code`` in their ``local/site.yaml``, agents restarted)."""
    for site in LIVE_SITES:
        settings = fed.kits[site] / "local" / "site.yaml"
        text = settings.read_text()
        assert "allow_custom_code: false" in text
        settings.write_text(text.replace("allow_custom_code: false", "allow_custom_code: true"))
        fed.agent(site).stop()
        fed.agent(site).start()
        with fed.client(site) as client:
            assert client.status().allow_custom_code
    app = tmp_path_factory.mktemp("apps") / "stall"
    (app / "custom").mkdir(parents=True)
    (app / "app.yaml").write_text(textwrap.dedent("""\
        name: stall
        trainer:
          path: stall_trainer.StallAtOneSite
        """))
    (app / "custom" / "stall_trainer.py").write_text(STALL_TRAINER)
    deploy(fed, app, LIVE_SITES)
    initial = app.parent / "initial.safetensors"
    save_file({"w": np.zeros((4, 4), np.float32)}, initial)
    return str(initial)


def stall_dag(fed, dag_id: str, initial: str, snapshots: str, stall_in: list[str], evaluate: bool) -> str:
    return dag_file(dag_id, {"train": dict(
        app_name="stall", flare_conn_id=fed.conn_id, sites=list(LIVE_SITES), min_clients=1, num_rounds=1,
        wait_time_after_min_received=3600.0,  # only train_timeout may end the wait
        train_timeout=TRAIN_TIMEOUT, initial_model=initial, snapshot_uri=snapshots, evaluate=evaluate,
        train_config={"stall_site": LIVE_SITES[1], "stall_in": stall_in},
    )})


@pytest.fixture
def stalled_site(fed):
    """The stalling site, and what its agent starts from now on; whatever is still active
    at the end is aborted (a failed test leaves no worker behind)."""
    site = LIVE_SITES[1]
    logs = AgentLogs(fed, [site])
    yield site, logs
    with fed.client(site) as client:
        for task_id in logs.started(site):
            if client.get_task(task_id).status in ("queued", "running"):
                client.abort(task_id)


def assert_aborted_and_gone(fed, site: str, logs: AgentLogs, task_id: str) -> None:
    with fed.client(site) as client:
        state = client.get_task(task_id)
    assert (state.status, state.error) == ("aborted", "aborted on request"), state
    (pid,) = logs.started(site)[task_id]
    wait_for(lambda: not process_group_alive(pid), 10, f"worker {pid} of task {task_id} to be gone")


def test_site_that_never_answers_is_dropped_at_train_timeout(fed, stall_app, stalled_site, run_dag, tmp_path, task_log,
                                                             measured):
    site, logs = stalled_site
    snapshots = (tmp_path / "snapshots").as_uri()
    started = time.monotonic()
    dag_run = run_dag(stall_dag(fed, "stalled_training", stall_app, snapshots, ["train"], False), "stalled_training")
    took = time.monotonic() - started
    log = task_log()
    assert dag_run.state == "success", log[-5000:]

    record = SnapshotStore(snapshots).latest("stalled_training", dag_run.run_id).state["history"][-1]
    assert record["accepted"] == [LIVE_SITES[0]]
    assert record["dropped"] == {site: "did not finish in time"}
    assert record["sites"][site]["status"] == "dropped"
    assert TRAIN_TIMEOUT <= record["duration_s"] < TRAIN_TIMEOUT + 30, record["duration_s"]
    assert "Round 1: stop waiting: train_timeout reached" in log
    assert f"on site {site} (aborted)" in log
    assert took < TRAIN_TIMEOUT + 120, f"the DAG run took {took:.0f} s"
    measured(f"stalled site: round over after {record['duration_s']:.1f} s (train_timeout {TRAIN_TIMEOUT:g} s), "
             f"DAG run {took:.1f} s")

    (task_id,) = logs.started(site)
    assert_aborted_and_gone(fed, site, logs, task_id)


def test_final_evaluation_that_never_answers_ends_at_train_timeout(fed, stall_app, stalled_site, run_dag, xcom,
                                                                    tmp_path, task_log):
    site, logs = stalled_site
    snapshots = (tmp_path / "snapshots").as_uri()
    started = time.monotonic()
    source = stall_dag(fed, "stalled_evaluation", stall_app, snapshots, ["evaluate"], True)
    dag_run = run_dag(source, "stalled_evaluation")
    took = time.monotonic() - started
    log = task_log()
    assert dag_run.state == "success", log[-5000:]
    assert took < TRAIN_TIMEOUT + 120, f"the DAG run took {took:.0f} s"
    evaluation = xcom(dag_run, "train")["evaluation"]["sites"]
    assert evaluation[LIVE_SITES[0]]["metrics"] == {"score": 1.0}
    assert f"evaluate task on site {site!r}" in evaluation[site]["error"], evaluation

    (task_id,) = [t for t in logs.started(site) if t.endswith("-evaluate")]
    assert_aborted_and_gone(fed, site, logs, task_id)

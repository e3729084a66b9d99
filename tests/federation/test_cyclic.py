"""Cyclic weight transfer with real agents: the model travels site to site and beats every
site alone; a worker killed mid-cycle resumes at its hop without training anything twice;
a failing site stops the run or is skipped, with the reason logged."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from fed_support import trainings

from flare_provider.client import load_caller_kit
from flare_provider.federation.cyclic import CyclicRun
from flare_provider.federation.cyclic_plan import CyclicPlan, visiting_orders
from flare_provider.federation.errors import RoundFailed
from flare_provider.federation.records import RunSpec
from flare_provider.snapshots import SnapshotStore
from site_agent.datasets.digits import write_holdout
from site_agent.worker.baseline import evaluate_weights, train_local_only

APP = Path(__file__).resolve().parents[2] / "examples" / "apps" / "digits"
SITES = ("site-1", "site-2", "site-3")
# One epoch per hop: the model sees every site's data each round, a site alone only its own.
ONE_EPOCH = {"epochs": 1}

CYCLIC_DAG = """
import pendulum
from airflow.sdk import DAG
from flare_provider.operators import CyclicOperator

with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False) as dag:
    CyclicOperator(task_id="train", app_name="digits", flare_conn_id="{conn}", num_rounds={rounds},
                   order="{order}", seed=7, train_config={{"epochs": 1}}, snapshot_uri="file://{snapshots}",
                   deferrable={deferrable}, poll_interval=0.3, evaluate={evaluate})
"""

RUN_ONCE = """
import importlib.util, sys, pendulum
spec = importlib.util.spec_from_file_location("dagfile", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
when = pendulum.parse(sys.argv[2])
module.dag.test(logical_date=when, run_after=when)
"""


@pytest.fixture(scope="module")
def fed(digits_federation):
    digits_federation.deploy_app(APP)
    return digits_federation


@pytest.fixture(scope="module")
def holdout(tmp_path_factory):
    folder = tmp_path_factory.mktemp("holdout")
    write_holdout(folder / "test.npz")
    return folder


def cyclic_dag(dag_id: str, conn: str, snapshots: Path, rounds: int, order: str = "fixed",
               deferrable: bool = False, evaluate: bool = False) -> str:
    return CYCLIC_DAG.format(dag_id=dag_id, conn=conn, snapshots=snapshots, rounds=rounds, order=order,
                             deferrable=deferrable, evaluate=evaluate)


def test_visiting_orders_are_reproducible_and_never_repeat_a_site_across_rounds():
    sites = ["a", "b", "c", "d"]
    assert visiting_orders(CyclicPlan("fixed"), sites, "run1", 3) == [sites] * 3
    plan = CyclicPlan("random", seed=3)
    assert visiting_orders(plan, sites, "run1", 5) == visiting_orders(CyclicPlan("random", seed=3), sites, "run1", 5)
    assert visiting_orders(plan, sites, "run1", 5) != visiting_orders(plan, sites, "run2", 5)
    assert visiting_orders(plan, sites, "run1", 5) != visiting_orders(CyclicPlan("random", seed=4), sites, "run1", 5)
    repeats = 0
    for seed in range(40):
        plain = visiting_orders(CyclicPlan("random", seed=seed), sites, "r", 6)
        repeats += sum(a[-1] == b[0] for a, b in zip(plain, plain[1:]))
        orders = visiting_orders(CyclicPlan("random_no_repeat", seed=seed), sites, "r", 6)
        assert all(sorted(o) == sites for o in orders)
        assert all(a[-1] != b[0] for a, b in zip(orders, orders[1:])), orders
    assert repeats > 0  # plain random does repeat: the rule above is what prevents it


def test_bad_plan_and_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="order must be one of fixed, random, random_no_repeat, got 'zigzag'"):
        CyclicPlan("zigzag")
    with pytest.raises(ValueError, match="on_failure must be one of stop, skip"):
        CyclicPlan(on_failure="retry")
    from flare_provider.operators import CyclicOperator

    with pytest.raises(ValueError, match="'train'.*num_rounds must be a positive integer.*warm_start='best' applies to"):
        CyclicOperator(task_id="train", app_name="digits", num_rounds=0, warm_start="best")


def test_cyclic_dag_beats_every_site_alone(run_dag, xcom, fed, tmp_path, holdout):
    rounds = 3
    dag_id = f"cyclic_{uuid.uuid4().hex[:6]}"
    conn = f"{fed.conn_id}_env"  # deferrable: dag.test() runs the trigger in line (see conftest)
    dag_run = run_dag(cyclic_dag(dag_id, conn, tmp_path / "snapshots", rounds, "random_no_repeat", deferrable=True,
                                 evaluate=True), dag_id)
    assert dag_run.state == "success"
    result = xcom(dag_run, "train")
    hops = rounds * len(SITES)
    assert (result["rounds_done"], result["hops_done"], result["skipped"]) == (rounds, hops, {})
    assert set(result["evaluation"]["sites"]) == set(SITES)

    store = SnapshotStore(f"file://{tmp_path}/snapshots")
    assert store.list_rounds(dag_id, dag_run.run_id) == list(range(hops + 1))  # every hop committed
    final = store.latest(dag_id, dag_run.run_id)
    # The committed orders are the ones the seed and the run give, and each hop went where they say.
    spec_key = RunSpec(dag_id, dag_run.run_id, "digits", SITES, rounds, 1).run_key
    orders = visiting_orders(CyclicPlan("random_no_repeat", seed=7), SITES, spec_key, rounds)
    assert final.state["cyclic"]["orders"] == orders
    assert [h["accepted"] for h in final.state["history"]] == [[site] for order in orders for site in order]

    cyclic = evaluate_weights(APP, store.load_weights(final), holdout)["accuracy"]
    # Each site alone, trained continuously for as many epochs as it trained in the cycle.
    epochs = rounds * ONE_EPOCH["epochs"]
    local = {site: evaluate_weights(APP, train_local_only(APP, fed.data_dir(site), epochs, ONE_EPOCH).weights, holdout)["accuracy"]
             for site in SITES}
    print("cyclic:", cyclic, "local only:", local)
    assert cyclic > max(local.values()) + 0.1, (cyclic, local)


def test_worker_killed_mid_cycle_resumes_at_its_hop(run_dag, fed, airflow_db, tmp_path):
    dag_id = f"cyclic_resume_{uuid.uuid4().hex[:6]}"
    source = cyclic_dag(dag_id, fed.conn_id, tmp_path / "snapshots", rounds=2)
    dag_file = airflow_db / "dags" / f"{dag_id}.py"
    dag_file.parent.mkdir(exist_ok=True)
    dag_file.write_text(source)
    logical_date = "2026-11-03T00:00:00+00:00"
    before = {site: set(trainings(fed, site)) for site in fed.sites}

    def new_trainings() -> dict[str, int]:
        return {t: n for s in fed.sites for t, n in trainings(fed, s).items() if t not in before[s]}

    worker = subprocess.Popen([sys.executable, "-c", RUN_ONCE, str(dag_file), logical_date],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 180
        while not any("-r0004-" in t for t in new_trainings()):  # hops 1-3 done, hop 4 training
            assert worker.poll() is None, "the worker ended before hop 4 started"
            assert time.monotonic() < deadline, "hop 4 never started"
            time.sleep(0.1)
        worker.send_signal(signal.SIGKILL)  # the worker dies mid-cycle
        worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()
    store = SnapshotStore(f"file://{tmp_path}/snapshots")
    run_id = store.list_runs(dag_id)[0]
    assert store.latest(dag_id, run_id).round == 3

    # Airflow's retry: the same DAG run again, in a new process (this one).
    dag_run = run_dag(source, dag_id, logical_date=logical_date)
    assert dag_run.state == "success"
    counts = new_trainings()
    assert sorted(t.split("-r")[1][:4] for t in counts) == [f"{h:04d}" for h in range(1, 7)], counts  # one task per hop
    assert all(n == 1 for n in counts.values()), counts  # nothing trained twice
    history = store.latest(dag_id, run_id).state["history"]
    assert [h["round"] for h in history] == list(range(1, 7))
    hop4 = history[3]
    assert hop4["sites"][hop4["accepted"][0]]["reattached"] is True  # taken up at the site, not sent again
    assert not any(h["sites"][h["accepted"][0]]["reattached"] for h in history[4:])


@pytest.fixture
def site2_without_data(fed):
    """site-2's training data moved away: its trainer fails for real, naming the missing file."""
    data = fed.data_dir("site-2") / "train.npz"
    data.rename(data.with_suffix(".away"))
    yield
    data.with_suffix(".away").rename(data)


def make_run(fed, tmp_path, on_failure: str) -> CyclicRun:
    spec = RunSpec(federation="cyclic_faults", run_id=uuid.uuid4().hex, app_name="digits", sites=SITES, num_rounds=1,
                   min_clients=1, train_timeout=120.0, train_config=ONE_EPOCH)
    return CyclicRun(spec, load_caller_kit(fed.server_kit), SnapshotStore(f"file://{tmp_path}/snapshots"),
                     plan=CyclicPlan("fixed", on_failure=on_failure))


def test_failing_site_is_skipped_with_the_reason_logged(fed, tmp_path, site2_without_data, caplog):
    caplog.set_level(logging.INFO, logger="flare_provider.federation")
    with make_run(fed, tmp_path, "skip") as run:
        progress = run.run()
        store, spec = run.store, run.spec
    assert progress.round == 3
    assert [h.accepted for h in progress.history] == [["site-1"], [], ["site-3"]]
    reason = progress.history[1].dropped["site-2"]
    assert "task failed" in reason and "data file 'train.npz' not found" in reason
    assert any("Hop 2 (round 1): site site-2 skipped" in r.getMessage() and "train.npz" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    # The model went on unchanged: hop 2 holds hop 1's weights, and site-3 trained from them.
    hop1, hop2, hop3 = (store.load_weights(store.get_round(spec.federation, spec.run_id, h)) for h in (1, 2, 3))
    assert all(np.array_equal(hop1[k], hop2[k]) for k in hop1)
    assert not all(np.array_equal(hop2[k], hop3[k]) for k in hop2)


def test_failing_site_stops_the_run_with_the_reason(fed, tmp_path, site2_without_data, caplog):
    with make_run(fed, tmp_path, "stop") as run:
        with pytest.raises(RoundFailed) as excinfo:
            run.run()
        store, spec = run.store, run.spec
    message = str(excinfo.value)
    assert "hop 2 (round 1): site 'site-2' failed" in message and "train.npz" in message and "on_failure is 'stop'" in message
    assert any("site site-2 failed" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert store.latest(spec.federation, spec.run_id).round == 1  # nothing after the failing hop
    assert not any(t.endswith("site-3") for t in trainings(fed, "site-3") if spec.run_key in t)

"""Federated training in a real Airflow run: three real agents, real PyTorch, snapshots in S3.

The DAG waits for the sites, deploys the signed digits app and runs FedAvg rounds; the
global model of every committed round is then read back from the S3 server and scored
on a held-out set no site trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from s3_server import TEST_KEYS

from flare_provider.snapshots import SnapshotStore
from site_agent.datasets.digits import write_holdout
from site_agent.worker.baseline import epochs_per_round, evaluate_weights, train_centralized, train_local_only

APP = Path(__file__).resolve().parents[2] / "examples" / "apps" / "digits"
ROUNDS = 5
# The sites' round config: SGD with momentum, the learning rate down a cosine across the
# run. The baselines train with the same settings.
TRAIN_CONFIG = {"lr": 0.2, "momentum": 0.9, "lr_schedule": "cosine"}

TRAIN_DAG = """
import pendulum
from airflow.sdk import DAG
from flare_provider.operators import DeployAppOperator, ScatterGatherOperator
from flare_provider.sensors.sites_ready import SitesReadySensor

with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False,
         params={{"rounds": {rounds}, "aggregator": "fedavg"}}) as dag:
    ready = SitesReadySensor(task_id="sites_ready", flare_conn_id="{conn}", poke_interval=1, timeout=120)
    deploy = DeployAppOperator(task_id="deploy", app_dir="{app}", flare_conn_id="{conn}")
    train = ScatterGatherOperator(
        task_id="train",
        app_name="digits",
        flare_conn_id="{conn}",
        num_rounds="{{{{ params.rounds }}}}",
        aggregator="{{{{ params.aggregator }}}}",
        train_config={train_config!r},
        min_clients=3,
        snapshot_uri="{snapshot_uri}",
        aws_conn_id="aws_test",
        deferrable={deferrable},
        poll_interval=0.5,
    )
    ready >> deploy >> train
"""


def training_dag(dag_id: str, fed, bucket: str, rounds: int, deferrable: bool = False, conn: str | None = None) -> str:
    return TRAIN_DAG.format(
        dag_id=dag_id, conn=conn or fed.conn_id, app=APP, rounds=rounds, deferrable=deferrable, train_config=TRAIN_CONFIG,
        snapshot_uri=f"s3://{bucket}/federations",
    )


@pytest.fixture(scope="module")
def store(s3, snapshot_bucket):
    settings = {"endpoint_url": s3.endpoint, **TEST_KEYS}
    return SnapshotStore(f"s3://{snapshot_bucket}/federations", s3_settings=settings)


@pytest.fixture(scope="module")
def holdout(tmp_path_factory):
    folder = tmp_path_factory.mktemp("holdout")
    write_holdout(folder / "test.npz")
    return folder


@pytest.fixture(scope="module")
def plain_run(run_dag, xcom, digits_federation, snapshot_bucket):
    dag_run = run_dag(training_dag("fed_plain", digits_federation, snapshot_bucket, ROUNDS), "fed_plain")
    return dag_run, xcom(dag_run, "train")


def test_training_dag_succeeds_and_returns_small_xcom(plain_run, snapshot_bucket):
    dag_run, result = plain_run
    assert dag_run.state == "success"
    assert result["rounds_done"] == ROUNDS
    assert result["model_uri"].startswith(f"s3://{snapshot_bucket}/federations/fed_plain/")
    assert set(result["evaluation"]["sites"]) == {"site-1", "site-2", "site-3"}
    assert 0.5 < result["evaluation"]["global"]["accuracy"] <= 1.0
    assert len(repr(result)) < 4000  # metrics and URIs only, never weights


def test_the_sites_trained_through_the_relay_with_no_port_open(plain_run, digits_federation):
    import psutil

    for site in digits_federation.sites:
        agent = psutil.Process(digits_federation.agent(site).proc.pid)
        listening = [c for p in (agent, *agent.children(recursive=True)) for c in p.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening == [], f"{site} listens on {listening}"
        # ... and its only TCP connections are to the relay
        peers = {c.raddr.port for c in agent.net_connections(kind="tcp") if c.raddr}
        assert peers <= set(digits_federation.relay_ports.values()), peers


def test_every_round_is_committed_to_s3(plain_run, s3, snapshot_bucket, store):
    dag_run, _ = plain_run
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=snapshot_bucket)["Contents"]]
    commits = sorted(k for k in keys if k.endswith("/COMMIT") and "/fed_plain/" in k)
    assert len(commits) == ROUNDS + 1  # round 0 holds the initial model
    assert store.list_rounds("fed_plain", dag_run.run_id) == list(range(ROUNDS + 1))
    latest = store.latest("fed_plain", dag_run.run_id)
    assert latest.round == ROUNDS
    history = latest.state["history"]
    assert [h["round"] for h in history] == list(range(1, ROUNDS + 1))
    assert all(h["accepted"] == ["site-1", "site-2", "site-3"] for h in history)


def test_accuracy_rises_beats_every_site_alone_and_nears_centralized(plain_run, store, digits_federation, holdout):
    dag_run, _ = plain_run
    accuracy = [
        evaluate_weights(APP, store.load_weights(store.get_round("fed_plain", dag_run.run_id, r)), holdout)["accuracy"]
        for r in range(1, ROUNDS + 1)
    ]
    print("global model accuracy by round:", accuracy)
    assert accuracy[-1] > accuracy[0] + 0.1
    assert all(later >= earlier - 0.03 for earlier, later in zip(accuracy, accuracy[1:])), accuracy

    # Each baseline: one continuous run of the epochs a site trains in the federation.
    epochs = ROUNDS * epochs_per_round(APP, TRAIN_CONFIG)
    folders = [digits_federation.data_dir(site) for site in digits_federation.sites]
    runs = {site: train_local_only(APP, folder, epochs, TRAIN_CONFIG) for site, folder in zip(digits_federation.sites, folders)}
    runs["centralized"] = train_centralized(APP, folders, epochs, TRAIN_CONFIG)
    assert all(r.progress == pytest.approx([(k + 1) / epochs for k in range(epochs)]) for r in runs.values())
    baseline = {name: evaluate_weights(APP, run.weights, holdout)["accuracy"] for name, run in runs.items()}
    central = baseline.pop("centralized")
    print("continuous baselines:", baseline, "centralized:", central)
    assert accuracy[-1] > max(baseline.values()), (accuracy[-1], baseline)
    assert accuracy[-1] >= 0.97 * central, (accuracy[-1], central)


def initialize_tasks(fed) -> int:
    """How many initial-model tasks the sites have run so far."""
    return sum(
        json.loads(state.read_text())["spec"]["kind"] == "initialize"
        for site in fed.sites
        for state in (fed.kits[site] / "work" / "tasks").glob("*/task.json")
    )


def test_deferrable_mode_gives_the_same_model(run_dag, digits_federation, snapshot_bucket, store):
    runs = {}
    for mode, deferrable in (("plain", False), ("deferred", True)):
        dag_id = f"fed_same_{mode}"
        conn = f"{digits_federation.conn_id}_env"  # see digits_federation
        before = initialize_tasks(digits_federation)
        dag_run = run_dag(training_dag(dag_id, digits_federation, snapshot_bucket, 2, deferrable, conn), dag_id)
        assert dag_run.state == "success", mode
        # One site built the initial model, once: coming back from the triggerer resumes from round 0.
        assert initialize_tasks(digits_federation) == before + 1, mode
        runs[mode] = store.load_weights(store.latest(dag_id, dag_run.run_id))
    assert runs["plain"].keys() == runs["deferred"].keys()
    for name in runs["plain"]:
        assert np.array_equal(runs["plain"][name], runs["deferred"][name]), name

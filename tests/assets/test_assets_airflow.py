"""The model Asset, the data-version watcher and the lineage facets in a real Airflow.

One deployment for the module: api-server, scheduler, dag-processor and triggerer
(LocalExecutor, SQLite) with OpenLineage writing its events to a file, two real agents
dialling out to a relay, snapshots in a file store. A one-round training DAG emits the
model Asset's event; ``dags/publish_model.py``, as shipped, runs on it, waits for a
person's approval (given through the REST API, as the UI does) and publishes the model;
a DAG scheduled on the sites' data Asset runs when a site's ``data_version`` changes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

from flare_provider.poc import free_port
from flare_provider.poc.airflow_api import AirflowApiError
from flare_provider.poc.local_airflow import LocalAirflow, airflow_env, simple_auth
from flare_provider.poc.processes import tail, wait_for

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "examples" / "apps" / "digits"
TRAIN_DAG = "assets_train"
OTHER_DAG = "assets_train_other"  # a second federation on the same sites, trained at the same time
USER = "admin"

TRAIN_SOURCE = """
import pendulum
from airflow.sdk import DAG
from flare_provider.operators import ScatterGatherOperator

with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False) as dag:
    ScatterGatherOperator(task_id="train", app_name="digits", flare_conn_id="{conn}", num_rounds={rounds}, min_clients=2,
                          train_config={{"epochs": 1}}, poll_interval=0.5)
"""

DATA_SOURCE = """
import pendulum
from airflow.sdk import DAG, task
from flare_provider.assets import site_data_asset

with DAG("assets_on_data", schedule=[site_data_asset("{conn}", min_sites=1, poll_interval=1.0)],
         start_date=pendulum.datetime(2026, 1, 1), catchup=False) as dag:

    @task
    def changes(*, triggering_asset_events=None):
        return [e.extra["payload"] for _, events in triggering_asset_events.items() for e in events]

    changes()
"""


@pytest.fixture(scope="module")
def deployment(sites, tmp_path_factory):
    root = tmp_path_factory.mktemp("assets-airflow")
    home, dags, logs = root / "home", root / "dags", root / "logs"
    for folder in (home, dags, logs):
        folder.mkdir()
    sites.deploy_app(APP)
    (dags / f"{TRAIN_DAG}.py").write_text(TRAIN_SOURCE.format(dag_id=TRAIN_DAG, conn=sites.conn_id, rounds=1))
    (dags / f"{OTHER_DAG}.py").write_text(TRAIN_SOURCE.format(dag_id=OTHER_DAG, conn=sites.conn_id, rounds=2))
    (dags / "assets_on_data.py").write_text(DATA_SOURCE.format(conn=sites.conn_id))
    shutil.copy(REPO / "dags" / "publish_model.py", dags / "publish_model.py")
    password = secrets.token_urlsafe(12)
    snapshots = f"file://{root / 'snapshots'}"
    lineage = root / "openlineage.jsonl"
    env = airflow_env(
        home, dags, free_port(), f"sqlite:///{home / 'airflow.db'}", "LocalExecutor", **simple_auth(home, {USER: password}),
        AIRFLOW__CORE__PARALLELISM="4",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="2",
        AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES="1",
        AIRFLOW__OPENLINEAGE__TRANSPORT=json.dumps({"type": "file", "log_file_path": str(lineage), "append": True}),
        AIRFLOW__OPENLINEAGE__NAMESPACE="flare-test",
        FLARE_SNAPSHOT_URI=snapshots,
        FLARE_PUBLISH_FEDERATION=TRAIN_DAG,
        GRPC_VERBOSITY="ERROR",
    )
    airflow = LocalAirflow(env, logs)
    try:
        airflow.run("db", "migrate", timeout=300)
        airflow.import_connections(json.loads(sites.connections_file.read_text()))
        airflow.add_components()
        airflow.start()
        airflow.wait_ready(180)
        airflow.api.login(USER, password)
        airflow.wait_for_dags([TRAIN_DAG, OTHER_DAG, "publish_model", "assets_on_data"], 180)
        yield airflow, root, lineage
    finally:
        airflow.stop()


def runs_of(airflow: LocalAirflow, dag_id: str) -> list[dict]:
    return airflow.api.call("GET", f"/dags/{dag_id}/dagRuns", params={"order_by": "-run_after"})["dag_runs"]


@pytest.fixture(scope="module")
def both_trained(deployment):
    """The training DAG and a second federation's DAG, triggered together on the same two sites."""
    airflow, _, _ = deployment
    runs = {dag_id: airflow.api.trigger(dag_id)["dag_run_id"] for dag_id in (TRAIN_DAG, OTHER_DAG)}
    results = {}
    for dag_id, run_id in runs.items():
        done = airflow.api.wait_for_run(dag_id, run_id, timeout=400, details=airflow.diagnostics)
        assert done["state"] == "success", airflow.api.failure_report(dag_id, run_id)
        results[dag_id] = (run_id, airflow.api.xcom(dag_id, run_id, "train"), done)
    return results


@pytest.fixture(scope="module")
def trained(both_trained):
    run_id, result, _ = both_trained[TRAIN_DAG]
    return run_id, result


def test_training_emits_the_model_asset_with_run_round_digest_metrics(deployment, trained, sites):
    airflow, root, _ = deployment
    run_id, result = trained
    def listed():
        # Airflow 3.3.2's listing answers 500 while a run the event created has no start date
        # yet (its response model requires one): ask again once publish_model's run started.
        try:
            return airflow.api.call("GET", "/assets/events", params={"source_dag_id": TRAIN_DAG})["asset_events"]
        except AirflowApiError:
            return None

    events = wait_for("the model's asset events", listed, timeout=60)
    (event,) = [e for e in events if e["source_run_id"] == run_id]
    extra = event["extra"]
    model_file = Path(unquote(result["model_uri"].removeprefix("file://")))
    assert extra["digest"] == hashlib.sha256(model_file.read_bytes()).hexdigest() == result["model_asset"]["digest"]
    assert (extra["federation"], extra["run_id"], extra["round"], extra["model_uri"]) == (TRAIN_DAG, run_id, 1, result["model_uri"])
    # the final round's metrics and the sites' evaluation of the final model, as the task returned them
    assert extra["metrics"] == {**result["final_metrics"], "evaluation": result["evaluation"]["global"]}
    assert 0 < extra["metrics"]["evaluation"]["accuracy"] <= 1
    assert set(extra["data_versions"]) == set(sites.sites) and all(v for v in extra["data_versions"].values())
    assert event["uri"] == f"file://{root / 'snapshots'}/{TRAIN_DAG}"


def test_publish_dag_runs_on_the_model_and_publishes_once_approved(deployment, trained):
    airflow, root, _ = deployment
    run_id, result = trained
    publish_run = wait_for("a publish_model run", lambda: next(iter(runs_of(airflow, "publish_model")), None),
                           timeout=120, details=airflow.diagnostics)["dag_run_id"]
    hitl = f"{airflow.api.run_path('publish_model', publish_run)}/taskInstances/approve/-1/hitlDetails"

    def awaiting():
        try:
            return airflow.api.call("GET", hitl)
        except Exception:
            return None

    detail = wait_for("the approval request", awaiting, timeout=120, details=airflow.diagnostics)
    # Answer only once the task waits for the answer (Airflow 3.3 parks it in awaiting_input,
    # earlier versions defer it): an answer while it is still running makes Airflow end the
    # task as one that should not be running any more.
    states = []

    def waiting():
        states.append(airflow.api.task_instance("publish_model", publish_run, "approve")["state"])
        return states[-1] in ("awaiting_input", "deferred")

    wait_for("the approval task waiting for its answer", waiting, timeout=120,
             details=lambda: f"approve's states seen: {sorted(set(states))}\n{airflow.diagnostics()}")
    # A person answers seconds later; an answer within milliseconds races Airflow 3.3.2: the
    # task is queued again before the scheduler hears that its first process ended, and the
    # scheduler then fails it as "finished with state success, but ... queued". Answer once
    # the scheduler has heard, as any human answer would.
    scheduler_log = airflow.logs / "scheduler.log"
    ended = f"Received executor event with state success for task instance TaskInstanceKey(dag_id='publish_model', task_id='approve', run_id='{publish_run}'"
    wait_for("the scheduler hearing that the approval task's process ended", lambda: ended in scheduler_log.read_text(),
             timeout=60, details=lambda: tail(scheduler_log, 30))
    assert detail["options"] == ["Approve", "Reject"]
    assert TRAIN_DAG in detail["subject"] and run_id in detail["body"]
    assert "The sites' evaluation of the final model" in detail["body"] and "accuracy" in detail["body"]
    assert (root / "snapshots" / "published").exists() is False  # nothing before the approval
    airflow.api.call("PATCH", hitl, json={"chosen_options": ["Approve"]})
    done = airflow.api.wait_for_run("publish_model", publish_run, timeout=120, details=airflow.diagnostics)
    assert done["state"] == "success", airflow.api.failure_report("publish_model", publish_run)
    published = root / "snapshots" / "published" / TRAIN_DAG
    record = json.loads((published / "model.json").read_text())
    assert record["digest"] == result["model_asset"]["digest"] == hashlib.sha256(
        (published / "model.safetensors").read_bytes()).hexdigest()
    assert (record["run_id"], record["round"]) == (run_id, 1)


def test_training_reports_lineage_sites_data_in_model_out(deployment, trained, sites):
    _, _, lineage = deployment
    run_id, result = trained

    def complete_event():
        if not lineage.exists():
            return None
        events = [json.loads(line) for line in lineage.read_text().splitlines() if line.strip()]
        return next((e for e in events if e["eventType"] == "COMPLETE" and e["job"]["name"] == f"{TRAIN_DAG}.train"), None)

    event = wait_for("the training task's COMPLETE lineage event", complete_event, timeout=60)
    project = json.loads(sites.connection_json())["extra"]["project"]
    inputs = {(d["namespace"], d["name"]): d["facets"]["version"]["datasetVersion"] for d in event["inputs"]}
    assert inputs == {(f"flare://{project}", f"{site}/data"): version
                      for site, version in result["model_asset"]["data_versions"].items()}
    (output,) = event["outputs"]
    assert (output["namespace"], output["name"]) == ("file", unquote(result["model_uri"].removeprefix("file://")))
    assert output["facets"]["version"]["datasetVersion"] == result["model_asset"]["digest"]


def test_a_site_data_version_change_raises_an_asset_event(deployment, sites):
    airflow, _, _ = deployment
    site = sites.sites[0]
    before = runs_of(airflow, "assets_on_data")
    assert before == []  # the sites' data has not changed since the trigger started
    log = airflow.logs / "triggerer.log"
    wait_for("the data-version trigger running", lambda: "Watching the data versions" in log.read_text(), timeout=120,
             details=lambda: tail(log, 30))
    time.sleep(3)  # its first poll: the versions it compares against
    with sites.client(site) as client:
        old = client.status().data_version
    sites.set_site_settings(site, data_version="e2e-2")
    run = wait_for("a run on the new data", lambda: next(iter(runs_of(airflow, "assets_on_data")), None), timeout=120,
                   details=lambda: tail(log, 30))
    done = airflow.api.wait_for_run("assets_on_data", run["dag_run_id"], timeout=120, details=airflow.diagnostics)
    assert done["state"] == "success", airflow.api.failure_report("assets_on_data", run["dag_run_id"])
    (payload,) = airflow.api.xcom("assets_on_data", run["dag_run_id"], "changes")
    assert payload["changed"] == {site: {"from": old, "to": "e2e-2"}}


def test_two_federations_train_at_once_on_the_same_sites(deployment, both_trained, sites):
    """Two DAGs, two federations, one Airflow, the same two sites: the runs overlap and each
    commits its own model, trained on both sites, in its own place in the store."""
    airflow, root, _ = deployment
    (_, result_a, done_a), (_, result_b, done_b) = both_trained[TRAIN_DAG], both_trained[OTHER_DAG]
    assert done_a["start_date"] < done_b["end_date"] and done_b["start_date"] < done_a["end_date"]  # at once
    assert (result_a["rounds_done"], result_b["rounds_done"]) == (1, 2)
    for dag_id, result in ((TRAIN_DAG, result_a), (OTHER_DAG, result_b)):
        model_file = Path(unquote(result["model_uri"].removeprefix("file://")))
        assert model_file.is_relative_to(root / "snapshots" / dag_id)
        assert hashlib.sha256(model_file.read_bytes()).hexdigest() == result["model_asset"]["digest"]
        assert set(result["model_asset"]["data_versions"]) == set(sites.sites)  # every site trained it
        assert result["evaluation"]["global"]["accuracy"] > 0.3  # ten classes: chance is 0.1
    assert result_a["model_asset"]["digest"] != result_b["model_asset"]["digest"]

"""A real federated run with real agents (mutual TLS through a relay on loopback), its
training curves kept: per round in the snapshot store, as TensorBoard event files read back
with TensorBoard's own reader, and in a real MLflow tracking server (SQLite store) as a
parent run with a child run per site, configured as an Airflow connection."""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from plugin.plugin_html import parse  # tests/ is on sys.path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tracking_support import MlflowServer

from flare_provider.client import load_caller_kit
from flare_provider.federation.records import RunSpec
from flare_provider.federation.scatter_gather import ScatterGatherRun
from flare_provider.plugins.app import _template
from flare_provider.plugins.dashboard import ConnectionView, connection_sites
from flare_provider.plugins.live import rounds_in_progress
from flare_provider.poc import prepare
from flare_provider.snapshots import SnapshotStore
from flare_provider.tracking.curves import load_curves
from flare_provider.tracking.hook import MlflowTrackingHook, mlflow_settings
from flare_provider.tracking.tracker import RunTracking

APP = Path(__file__).resolve().parents[2] / "examples" / "apps" / "digits"
EPOCHS, ROUNDS = 3, 2
FIRST_ROUND_EPOCHS = 200  # long enough for the page to see round 1 in progress
STEPS = [*range(FIRST_ROUND_EPOCHS), *range(FIRST_ROUND_EPOCHS, FIRST_ROUND_EPOCHS + EPOCHS)]  # run-wide
EXPERIMENT = f"tracking-{uuid.uuid4().hex[:6]}"
CONN_ID = "mlflow_tracking_test"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Two sites train two rounds of three epochs; site-1 lets only ``train_loss`` leave."""
    root = tmp_path_factory.mktemp("tracking")
    mlflow = MlflowServer(root)  # starts while the federation comes up
    fed = prepare(root / "poc", f"tracked_{uuid.uuid4().hex[:6]}", 2, connect="outbound")
    fed.set_site_settings("site-1", metrics={"allow": ["train_loss"], "points_per_second": 1_000_000})
    fed.set_site_settings("site-2", metrics={"points_per_second": 1_000_000})
    os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps(
        {"conn_type": "mlflow", "host": mlflow.uri, "extra": {"experiment_name": EXPERIMENT}})
    fed.start_agents()
    try:
        fed.deploy_app(APP)
        mlflow.wait_ready()
        store = SnapshotStore(f"file://{root}/snapshots")
        spec = RunSpec(federation="tracked", run_id=f"manual__{uuid.uuid4().hex[:8]}", app_name="digits",
                       sites=fed.sites, num_rounds=ROUNDS, min_clients=2, train_timeout=300.0,
                       train_config={"epochs": EPOCHS}, round_configs={1: {"epochs": FIRST_ROUND_EPOCHS}})
        extra = {"airflow": {"dag_id": "tracked_dag", "task_id": "train", "run_id": spec.run_id}}
        with ScatterGatherRun(spec, load_caller_kit(fed.server_kit), store, mlflow=mlflow_settings(CONN_ID),
                              extra_state=extra) as run, ThreadPoolExecutor(1) as pool:
            running = pool.submit(run.run)
            live = watch_the_page(fed, running)
            progress = running.result()
        yield {"fed": fed, "store": store, "spec": spec, "root": root, "mlflow": mlflow, "progress": progress, "live": live}
    finally:
        os.environ.pop(f"AIRFLOW_CONN_{CONN_ID.upper()}", None)
        os.environ.pop(f"AIRFLOW_CONN_{fed.conn_id.upper()}", None)
        fed.stop_agents()
        mlflow.stop()


def watch_the_page(fed, running) -> list[ConnectionView]:
    """What the Federation page reads from the agents (through the ``flare`` connection) while
    the run trains: every answer in which some site reported a few points of its curve."""
    os.environ[f"AIRFLOW_CONN_{fed.conn_id.upper()}"] = fed.connection_json()
    seen = []
    while not running.done():
        view = connection_sites(fed.conn_id, timeout=5)
        if any(len(t["history"]) >= 3 for site in view.sites for t in site.tasks):
            seen.append(view)
        time.sleep(0.2)
    return seen


def tensorboard_folder(tracked) -> Path:
    spec = tracked["spec"]
    from flare_provider.tracking.run_files import RunFiles

    return Path(RunFiles(tracked["store"], spec.federation, spec.run_id).uri("tensorboard").removeprefix("file://"))


def read_events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_shows_each_sites_curves_and_the_global_model_by_round(tracked):
    folder = tensorboard_folder(tracked)
    assert sorted(p.name for p in folder.iterdir()) == ["global", "site-1", "site-2"]
    run_wide_steps = STEPS  # each round's epochs go on where the last round's ended
    for site in ("site-1", "site-2"):
        events = read_events(folder / site)
        tags = set(events.Tags()["scalars"])
        loss = scalars(events, "train_loss")
        assert [step for step, _ in loss] == run_wide_steps
        assert loss[-1][1] < loss[0][1]  # it learns
        assert [step for step, _ in scalars(events, "round/val_accuracy")] == [1, 2]
        assert all(0 <= v <= 1 for _, v in scalars(events, "round/val_accuracy"))
        # site-1's site.yaml lets only train_loss leave as a curve; site-2 allows every metric
        assert ("train_accuracy" in tags) == (site == "site-2")
    events = read_events(folder / "global")
    assert [step for step, _ in scalars(events, "round/val_accuracy")] == [1, 2]
    assert [value for _, value in scalars(events, "round/sites")] == [2.0, 2.0]
    # the global model's value is the sites' round results weighted by their samples
    history = tracked["progress"].history
    assert scalars(events, "round/val_accuracy")[-1][1] == pytest.approx(history[-1].metrics["val_accuracy"])


def test_each_rounds_curves_are_stored_with_the_run_and_a_resumed_run_goes_on_from_them(tracked):
    store, spec = tracked["store"], tracked["spec"]
    tracking = RunTracking(spec, store)
    curves = load_curves(tracking.files, 2)
    assert sorted(curves.sites) == ["site-1", "site-2"]
    site2 = curves.sites["site-2"]
    assert site2.step_base == FIRST_ROUND_EPOCHS and [p["step"] for p in site2.points] == STEPS[-EPOCHS:]
    assert set(site2.points[0]["values"]) == {"train_loss", "train_accuracy"}
    assert set(curves.sites["site-1"].points[0]["values"]) == {"train_loss"}
    assert curves.next_step_base == {"site-1": len(STEPS), "site-2": len(STEPS)}
    tracking.resume(2)  # as a retried worker restoring round 2 would
    assert tracking.bases == {"site-1": len(STEPS), "site-2": len(STEPS)}


def test_mlflow_holds_the_run_and_a_child_run_per_site_with_metrics_params_and_the_model(tracked):
    runs = tracked["mlflow"].runs(EXPERIMENT)
    spec = tracked["spec"]
    (parent,) = [r for r in runs if r["tags"].get("flare_role") == "run"]
    children = {r["tags"]["flare_site"]: r for r in runs if r["tags"].get("flare_role") == "site"}
    assert sorted(children) == ["site-1", "site-2"] and len(runs) == 3
    assert parent["status"] == "FINISHED" and all(c["status"] == "FINISHED" for c in children.values())
    assert all(c["tags"]["mlflow.parentRunId"] == parent["id"] for c in children.values())
    assert parent["tags"]["airflow_dag_id"] == "tracked_dag" and parent["tags"]["flare_run_id"] == spec.run_id
    assert parent["params"]["num_rounds"] == "2" and json.loads(parent["params"]["train_config"]) == {"epochs": EPOCHS}
    assert [step for step, _ in parent["metrics"]["round/val_accuracy"]] == [1, 2]
    assert parent["artifacts"] == ["model/model.safetensors"]
    for site, child in children.items():
        assert [step for step, _ in child["metrics"]["train_loss"]] == STEPS
        assert [step for step, _ in child["metrics"]["round/val_accuracy"]] == [1, 2]
        assert ("train_accuracy" in child["metrics"]) == (site == "site-2")
    # The artifact is the run's final model, byte for byte.
    artifact = next((tracked["root"] / "artifacts").rglob("model.safetensors"))
    final = tracked["store"].get_round(spec.federation, spec.run_id, ROUNDS)
    assert artifact.read_bytes() == Path(final.model_uri.removeprefix("file://")).read_bytes()


def test_a_retried_round_is_not_logged_to_mlflow_twice(tracked):
    spec, store = tracked["spec"], tracked["store"]
    settings = MlflowTrackingHook(CONN_ID).get_settings()  # the Airflow connection, as the operators read it
    assert settings.experiment == EXPERIMENT
    again = RunTracking(spec, store, mlflow=settings)  # a retried worker: finds the same runs by their tags
    curves = load_curves(again.files, 2)
    assert again.mlflow.log_round(curves, {"val_accuracy": 0.0}, None, 1, 2) is False
    runs = tracked["mlflow"].runs(EXPERIMENT)
    assert len(runs) == 3
    (parent,) = [r for r in runs if r["tags"].get("flare_role") == "run"]
    assert len(parent["metrics"]["round/val_accuracy"]) == 2


def test_the_page_draws_the_round_in_progress_from_what_the_sites_report(tracked):
    # round 2's three epochs may be seen too, when a poll falls in it: take round 1's last view
    round_one = [view for view in tracked["live"] if [live.round for live in rounds_in_progress([view])] == [1]]
    assert round_one, "the page never saw a site's curve while round 1 trained"
    (live,) = rounds_in_progress([round_one[-1]])
    assert live.round == 1 and live.app == "digits" and live.run_key == tracked["spec"].run_key
    curves = live.curves()
    for site, points in curves["train_loss"].items():
        steps = [step for step, _ in points]
        assert steps == sorted(steps) and len(steps) >= 1
    assert "train_accuracy" not in json.dumps(live.sites.get("site-1", {}))  # site-1's allow-list holds at the source
    assert json.loads(json.dumps(live.to_dict()))["round"] == 1  # what /flare/curves answers
    colors = {"site-1": "#111111", "site-2": "#222222"}
    page = parse(_template("live_curves.html").render(live_rounds=[live], live_colors=colors, now="now"))
    (section,) = page.select("div", class_="live-round")
    assert section.attrs["data-round"] == "1"
    chart = section.one("svg", **{"data-metric": "train_loss"})
    drawn = {g.attrs["data-series"]: [int(c.attrs["data-step"]) for c in g.select("circle")] for g in chart.select("g")}
    assert drawn == {site: [step for step, _ in points] for site, points in curves["train_loss"].items()}
    empty = parse(_template("live_curves.html").render(live_rounds=[], live_colors={}, now="now"))
    assert empty.one("p", id="no-live-round").text == "No site is training a round right now."

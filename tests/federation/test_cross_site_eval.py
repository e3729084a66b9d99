"""Cross-site evaluation with real agents and real PyTorch on the digits task.

site-1 and site-2 allow sharing their local model (``share_local_model: true`` in their
``local/site.yaml``), site-3 keeps the default (off). A DAG trains two rounds and then runs
``CrossSiteEvalOperator``; the matrix it stores with the run (on a real S3-protocol server)
is checked against each model evaluated at each site directly, in this process, with the
trainer's own ``evaluate``.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from pathlib import Path

import pytest

from flare_provider.client import load_caller_kit
from flare_provider.federation.cross_site import CrossSiteEval
from flare_provider.federation.cross_site_matrix import LOCAL_INDEX, cross_site_key, local_model_key, read_matrix
from flare_provider.snapshots import SnapshotStore, encode_name
from flare_provider.wire.app_config import load_app_config
from flare_provider.wire.tensors import describe_file

APP = Path(__file__).resolve().parents[2] / "examples" / "apps" / "digits"
SHARING = ("site-1", "site-2")
NOT_SHARING = "site-3"
ROUNDS = 2

DAG = """
import pendulum
from airflow.sdk import DAG
from flare_provider.operators import CrossSiteEvalOperator, ScatterGatherOperator

with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False) as dag:
    store = dict(snapshot_uri="s3://{bucket}/federations", aws_conn_id="aws_test", flare_conn_id="{conn}")
    train = ScatterGatherOperator(task_id="train", app_name="digits", federation="{federation}", num_rounds={rounds},
                                  wait_time_after_min_received=60, evaluate=False, **store)
    train >> CrossSiteEvalOperator(task_id="cross_site", app_name="digits", **store)
"""


@pytest.fixture(scope="module")
def fed(digits_federation):
    """The module's federation, with site-1 and site-2 restarted to read their new setting."""
    for site in SHARING:
        digits_federation.set_site_settings(site, share_local_model=True)
        digits_federation.agent(site).stop()
    digits_federation.start_agents(list(SHARING))
    digits_federation.deploy_app(APP)
    return digits_federation


@pytest.fixture(scope="module")
def store(s3, snapshot_bucket) -> SnapshotStore:
    settings = {"endpoint_url": s3.endpoint, "aws_access_key_id": "testing", "aws_secret_access_key": "testing-secret",
                "region_name": "us-east-1"}
    return SnapshotStore(f"s3://{snapshot_bucket}/federations", s3_settings=settings)


@pytest.fixture(scope="module")
def evaluated(run_dag, xcom, fed, snapshot_bucket):
    """The DAG run, its federation, and what the two tasks returned."""
    dag_id = f"xsite_{uuid.uuid4().hex[:6]}"
    federation = f"xsite_fed_{uuid.uuid4().hex[:6]}"
    source = DAG.format(dag_id=dag_id, bucket=snapshot_bucket, conn=fed.conn_id, federation=federation, rounds=ROUNDS)
    dag_run = run_dag(source, dag_id)
    assert dag_run.state == "success"
    return dag_run, federation, xcom(dag_run, "train"), xcom(dag_run, "cross_site")


def evaluate_directly(model_file: Path, site: str, fed, work: Path) -> tuple[int, dict[str, float]]:
    """``model_file`` scored on ``site``'s validation data here, by the app's trainer, as a worker does."""
    from site_agent.trainer import TaskContext
    from site_agent.worker.task_runner import load_trainer_class
    from site_agent.worker.weights import load_weights

    config = load_app_config(APP)
    trainer_cls = load_trainer_class(config.trainer_path, APP, allow_custom_code=False)
    weights = load_weights(model_file, getattr(trainer_cls, "tensor_format", "numpy"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = TaskContext(task_id="direct", site=site, round=ROUNDS, kind="evaluate", config={}, data_dir=fed.data_dir(site),
                      work_dir=work, app_dir=APP, device="cpu")
    result = trainer_cls(**config.trainer_args).evaluate(weights, ctx)
    return result.num_samples, dict(result.metrics)


def local_model_file(store: SnapshotStore, federation: str, run: str, site: str, dest: Path) -> Path:
    index = json.loads(store.backend.get_bytes(cross_site_key(federation, run, LOCAL_INDEX)))
    got = store.backend.download(local_model_key(federation, run, site), dest)
    assert got == (index["models"][site]["sha256"], index["models"][site]["size"])
    return dest


def test_the_matrix_equals_each_model_evaluated_directly_at_each_site(evaluated, store, fed, tmp_path):
    dag_run, federation, trained, _ = evaluated
    matrix = read_matrix(store, federation, dag_run.run_id)
    assert matrix.model_names == ["global", *SHARING]
    assert matrix.sites == list(fed.sites) and matrix.metrics == ["accuracy", "loss"]
    assert matrix.errors == {}
    assert [m["round"] for m in matrix.models] == [ROUNDS, ROUNDS, ROUNDS]

    last = store.get_round(federation, dag_run.run_id, ROUNDS)
    files = {"global": store.download_weights(last, tmp_path / "global.safetensors")}
    for site in SHARING:
        files[site] = local_model_file(store, federation, dag_run.run_id, site, tmp_path / f"{site}.safetensors")
        # The site's own result of the last round (its task id in the file), not the global model.
        assert describe_file(files[site])[1]["flare.task_id"] == last.state["history"][-1]["sites"][site]["task_id"]
    scores = []
    for model, path in files.items():
        for site in fed.sites:
            num_samples, metrics = evaluate_directly(path, site, fed, tmp_path / "work")
            assert matrix.num_samples[site] == num_samples
            stored = matrix.values[model][site]
            assert stored.keys() == metrics.keys()
            for name, value in metrics.items():
                assert math.isclose(stored[name], value, rel_tol=1e-6, abs_tol=1e-9), (model, site, name, stored, metrics)
            scores.append(stored["accuracy"])
    print("accuracy, models x sites:", [round(a, 4) for a in scores])
    assert len(set(scores)) > 3  # different models and non-IID sites score differently


def test_a_site_that_does_not_share_has_no_row_and_its_model_never_left(evaluated, store, fed, s3, snapshot_bucket):
    from site_agent.site_settings import load_site_settings

    dag_run, federation, _, summary = evaluated
    last = store.get_round(federation, dag_run.run_id, ROUNDS)
    # site-3 trained and was aggregated in the last round: its model is missing by its own choice.
    assert NOT_SHARING in last.state["history"][-1]["accepted"]
    matrix = read_matrix(store, federation, dag_run.run_id)
    assert NOT_SHARING not in matrix.model_names and matrix.not_shared == [NOT_SHARING]
    assert summary["not_shared"] == [NOT_SHARING] and NOT_SHARING not in summary["models"]
    # Nothing of it in the store: the cross_site folder holds the shared models, their index and the matrix.
    prefix = f"federations/{cross_site_key(federation, dag_run.run_id)}/"
    keys = sorted(o["Key"][len(prefix):] for o in s3.client().list_objects_v2(Bucket=snapshot_bucket, Prefix=prefix)["Contents"])
    assert keys == ["local/index.json", "local/site-1.safetensors", "local/site-2.safetensors", "matrix.json"]
    # Every site was sent the global model and the two shared ones, and nothing else, to evaluate.
    for site in fed.sites:
        audit = load_site_settings(fed.kits[site]).work_dir / "audit.jsonl"
        submitted = [json.loads(line) for line in audit.read_text().splitlines()]
        evaluations = sorted({e["task_id"].rsplit("-xsite-", 1)[1] for e in submitted
                              if e["method"] == "SubmitTask" and "-xsite-" in e.get("task_id", "")})
        assert evaluations == ["global", "local-site-1", "local-site-2"], (site, evaluations)


def test_the_matrix_is_stored_with_the_run_and_summarised_in_xcom(evaluated, store, snapshot_bucket):
    dag_run, federation, trained, summary = evaluated
    uri = f"s3://{snapshot_bucket}/federations/{encode_name(federation)}/{encode_name(dag_run.run_id)}/cross_site/matrix.json"
    assert summary["matrix_uri"] == uri and (summary["federation"], summary["run_id"]) == (federation, dag_run.run_id)
    matrix = read_matrix(store, federation, dag_run.run_id)
    means = {}
    for model, row in matrix.values.items():
        means[model] = {m: sum(cell[m] for cell in row.values()) / len(row) for m in matrix.metrics}
        assert summary["models"][model]["mean"] == pytest.approx(means[model], rel=1e-12)
        assert summary["models"][model]["sites_evaluated"] == 3
    best = max(means, key=lambda m: means[m]["accuracy"])
    assert summary["best"] == {"model": best, "metric": "accuracy", "mode": "max", "value": pytest.approx(means[best]["accuracy"])}
    assert summary["errors"] == 0
    assert len(json.dumps(summary)) < 2000  # numbers and names, never weights
    assert trained["run_id"] == dag_run.run_id


def test_evaluating_again_reattaches_to_the_sites_evaluations(evaluated, store, fed):
    """A retried task asks for the same task ids: the sites hand back what they scored, nothing runs again."""
    dag_run, federation, _, _ = evaluated

    def started() -> int:
        return sum(len(re.findall(r"task \S+-xsite-\S+ running in process", fed.agent(s).log_path.read_text())) for s in fed.sites)

    before, first = started(), read_matrix(store, federation, dag_run.run_id)
    assert before == 3 * 3  # three models, three sites, each scored once
    kit = load_caller_kit(fed.server_kit)
    with CrossSiteEval(kit, store, federation, dag_run.run_id, "digits", model_round=ROUNDS) as again:
        matrix = again.run()
    assert matrix.values == first.values and matrix.model_names == first.model_names
    assert started() == before


def test_bad_arguments_and_settings_are_refused_clearly(tmp_path):
    from flare_provider.operators import CrossSiteEvalOperator
    from site_agent.errors import SettingsError
    from site_agent.site_settings import parse_site_settings

    with pytest.raises(ValueError, match="model_round must be a round number >= 0, got -1.*best_mode must be one of max, min"):
        CrossSiteEvalOperator(task_id="x", app_name="digits", model_round=-1, best_mode="up")
    with pytest.raises(ValueError, match="snapshot_uri must be s3://bucket/prefix or file:///path"):
        CrossSiteEvalOperator(task_id="x", app_name="digits", snapshot_uri="/tmp/snapshots")
    doc = {"data_dir": "data", "work_dir": "work", "share_local_model": "yes"}
    with pytest.raises(SettingsError, match="site.yaml: 'share_local_model' must be true or false, found 'yes'"):
        parse_site_settings(doc, tmp_path)
    assert parse_site_settings({"data_dir": "data", "work_dir": "work"}, tmp_path).share_local_model is False


def test_only_accepted_results_their_sites_shared_are_stored_and_a_difference_as_the_model_it_makes(tmp_path):
    """The keeping on its own, with a real file store: what the index names, and each stored model."""
    import numpy as np

    from flare_provider.federation.cross_site import SharedLocalModels
    from flare_provider.wire.tensors import load_file, save_file

    store = SnapshotStore(f"file://{tmp_path / 'store'}")
    work = tmp_path / "work"
    work.mkdir()
    global_weights = {"w": np.ones(4, np.float32), "b": np.zeros(2, np.float32)}
    results = {
        "a": ({"w": np.full(4, 0.5, np.float32), "b": np.ones(2, np.float32)}, "difference", "true"),
        "b": ({**global_weights, "scaffold.dc.w": np.ones(4, np.float32)}, "weights", "true"),  # a control variate rides along
        "c": (global_weights, "weights", "false"),  # not shared
        "d": (global_weights, "weights", "true"),  # shared, but its update is rejected
        "e": (global_weights, "weights", "true"),  # shared, but it does not make the round
    }
    kept = SharedLocalModels(store, "fed", "run-1", work)
    for site, (tensors, kind, share) in results.items():
        path = tmp_path / f"{site}.safetensors"
        metadata = {"flare.result_kind": kind, "flare.task_id": f"task-{site}", "flare.share_local_model": share}
        save_file(tensors, path, metadata)
        kept.keep(site, path, metadata)
        path.unlink()  # the aggregator takes the file away: the kept model must not depend on it
    kept.discard("d")
    assert kept.publish(7, ["a", "b", "c", "d"], global_weights) == ["a", "b"]
    index = json.loads(store.backend.get_bytes(cross_site_key("fed", "run-1", LOCAL_INDEX)))
    assert (index["round"], sorted(index["models"]), index["not_shared"]) == (7, ["a", "b"], ["c"])
    stored = {site: load_file(store.backend.local_path(local_model_key("fed", "run-1", site))) for site in ("a", "b")}
    assert sorted(stored["a"]) == sorted(stored["b"]) == ["b", "w"]
    assert np.array_equal(stored["a"]["w"], np.full(4, 1.5, np.float32)) and np.array_equal(stored["a"]["b"], np.ones(2))
    assert all(np.array_equal(stored["b"][k], global_weights[k]) for k in global_weights)
    for site in "cde":
        assert store.backend.stat(local_model_key("fed", "run-1", site)) is None
    assert list(work.iterdir()) == []  # nothing held once published

"""The example DAGs in ``dags/``: they parse fast and light, build what their docstrings say,
and the provisioning one provisions in a real Airflow run."""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
DAG_FILES = {
    "provision_federation.py": "provision_federation",
    "train_federation.py": "train_federation",
    "recurring_federation.py": "recurring_federation",
    "publish_model.py": "publish_model",
    "retrain_on_data.py": "retrain_on_data",
}
# What the Airflow side must not need to parse a DAG: the agent, PyTorch, gRPC, numpy, the
# workflow engines (operators check their arguments with the light plain-data modules only).
HEAVY = ("torch", "numpy", "grpc", "safetensors", "boto3", "sklearn", "site_agent",
         "flare_provider.federation.scatter_gather", "flare_provider.federation.communicator",
         "flare_provider.federation.checkpoints", "flare_provider.federation.cyclic",
         "flare_provider.federation.cross_site", "flare_provider.aggregation.base")

# Parses one DAG file in a fresh interpreter the way the dag-processor does: Airflow is
# loaded already and the DAGs folder is on sys.path. With "block", the heavy packages
# cannot be imported at all, as on an Airflow deployment without them.
PARSE = """
import importlib.abc, importlib.util, json, sys, time
dags, path, block, heavy = sys.argv[1], sys.argv[2], sys.argv[3] == "block", sys.argv[4].split(",")

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in heavy:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

if block:
    sys.meta_path.insert(0, NotInstalled())
sys.path.append(dags)
from airflow.sdk import DAG, BaseOperator, BaseSensorOperator, Param  # noqa: F401  (loaded in a dag-processor)

wall, cpu = time.perf_counter(), time.process_time()
spec = importlib.util.spec_from_file_location("dag_under_test", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
loaded = [m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy)]
print(json.dumps({"wall": wall, "cpu": cpu, "heavy": loaded, "dag_id": module.dag.dag_id}))
"""


@pytest.mark.parametrize("mode", ["plain", "block"])
@pytest.mark.parametrize("filename", sorted(DAG_FILES))
def test_dag_file_parses_fast_without_heavy_imports(filename, mode):
    out = subprocess.run(
        [sys.executable, "-c", PARSE, str(DAGS), str(DAGS / filename), mode, ",".join(HEAVY)],
        capture_output=True, text=True, timeout=120, env=os.environ.copy(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dag_id"] == DAG_FILES[filename]
    assert result["heavy"] == []
    print(f"{filename} ({mode}) parsed in {result['cpu'] * 1000:.0f} ms CPU, {result['wall'] * 1000:.0f} ms wall")
    # CPU time: the file's own cost, which a busy machine does not inflate as it does wall time.
    assert result["cpu"] < 0.25, result


@pytest.fixture(scope="module")
def dagbag():
    """The DAGs folder as Airflow's dag-processor loads it (a bundle: the folder on sys.path)."""
    from airflow.dag_processing.dagbag import BundleDagBag

    return BundleDagBag(str(DAGS), bundle_path=DAGS, bundle_name="dags-folder")


def test_dagbag_loads_every_example_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert sorted(dagbag.dag_ids) == sorted(DAG_FILES.values())
    # The helper module is not parsed as a DAG file (.airflowignore).
    assert sorted(Path(f).name for f in dagbag.file_last_changed) == sorted(DAG_FILES)
    for filename in DAG_FILES:  # each explains itself at the top
        assert len(ast.get_docstring(ast.parse((DAGS / filename).read_text())) or "") > 200, filename


def test_training_dags_wait_deploy_train(dagbag):
    from flare_provider.aggregation.names import BUILTIN_AGGREGATORS

    for dag_id in ("train_federation", "recurring_federation"):
        dag = dagbag.get_dag(dag_id)
        assert dag.render_template_as_native_obj
        assert dag.get_task("sites_ready").downstream_task_ids == {"deploy"}
        assert dag.get_task("deploy").downstream_task_ids == {"train"}
        train = dag.get_task("train")
        assert (train.num_rounds, train.min_clients, train.aggregator) == (
            "{{ params.rounds }}", "{{ params.min_clients }}", "{{ params.aggregator }}")
        assert train.evaluate and train.retries == 2
        assert train.flare_conn_id == os.environ.get("FLARE_CONN_ID", "flare_default")
        app_dir = os.environ.get("FLARE_APP_DIR") or REPO / "examples" / "apps" / "digits"
        assert Path(dag.get_task("deploy").app_dir) == Path(app_dir)
        assert dag.params["rounds"] == 5 and dag.params["min_clients"] is None and dag.params["aggregator"] == "fedavg"
        assert dag.params.get_param("aggregator").schema["enum"] == list(BUILTIN_AGGREGATORS)
        assert train.aggregator_args == {} and train.train_config == {}  # none set in the environment

    train_dag = dagbag.get_dag("train_federation")
    assert train_dag.schedule is None and not train_dag.get_task("train").deferrable
    recurring = dagbag.get_dag("recurring_federation")
    assert recurring.schedule == "@weekly" and recurring.timetable.expression == "0 0 * * 0"
    assert recurring.catchup is False and recurring.max_active_runs == 1
    assert recurring.get_task("train").initial_model == "previous"
    assert recurring.get_task("train").deferrable is True


def test_model_and_data_assets_link_the_example_dags(dagbag):
    """publish_model follows train_federation's model; retrain_on_data follows the sites' data."""
    from flare_provider.triggers.data_version import DataVersionTrigger

    model = dagbag.get_dag("train_federation").get_task("train").model_asset
    assert model.name == "flare-model/train_federation"
    assert list(dagbag.get_dag("publish_model").timetable.asset_condition.objects) == [model]
    assert dagbag.get_dag("publish_model").get_task("approve").task_type == "ApprovalOperator"
    (data,) = dagbag.get_dag("retrain_on_data").timetable.asset_condition.objects
    (watcher,) = data.watchers
    assert isinstance(watcher.trigger, DataVersionTrigger) and watcher.trigger.min_sites >= 1
    assert dagbag.get_dag("retrain_on_data").get_task("train").initial_model == "previous"


@pytest.mark.parametrize(
    "conf",
    [{"rounds": 0}, {"rounds": "five"}, {"min_clients": 0}, {"aggregator": "fedsum"}],
    ids=["rounds-0", "rounds-text", "min-clients-0", "unknown-aggregator"],
)
def test_trigger_form_rejects_bad_params(dagbag, conf):
    from airflow.sdk.exceptions import ParamValidationError

    params = copy.deepcopy(dagbag.get_dag("train_federation").params)
    with pytest.raises(ParamValidationError):  # raised on update, as the trigger form does on input
        params.update(conf)
        params.validate()


def test_trigger_form_accepts_good_params(dagbag):
    params = copy.deepcopy(dagbag.get_dag("train_federation").params)
    params.update({"rounds": 3, "min_clients": 2, "aggregator": "fedadam"})
    assert params.validate() == {"rounds": 3, "min_clients": 2, "aggregator": "fedadam"}


# The training DAG file loaded as the dag-processor does, in an environment of our choosing.
TRAINING_SETTINGS = """
import json, sys
sys.path.append(sys.argv[1])
import importlib.util
spec = importlib.util.spec_from_file_location("train_dag", sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
train, params = module.dag.get_task("train"), module.dag.params
print(json.dumps({"aggregator_args": train.aggregator_args, "train_config": train.train_config,
                  "aggregator": params["aggregator"], "offered": params.get_param("aggregator").schema["enum"]}))
"""


def load_training_dag(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", TRAINING_SETTINGS, str(DAGS), str(DAGS / "train_federation.py")],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )


def test_training_dag_takes_the_recipe_from_the_environment():
    """As ``make demo`` sets it: the sites' round config and the server optimizer's settings."""
    out = load_training_dag(
        FLARE_TRAIN_CONFIG='{"epochs": 1, "lr": 0.2, "lr_schedule": "cosine"}',
        FLARE_AGGREGATOR="fedadam",
        FLARE_AGGREGATOR_ARGS='{"server_lr": 0.03, "beta1": 0.5}',
    )
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == {
        "aggregator_args": {"server_lr": 0.03, "beta1": 0.5},
        "train_config": {"epochs": 1, "lr": 0.2, "lr_schedule": "cosine"},
        "aggregator": "fedadam",
        "offered": ["fedadam"],  # the arguments fit no other aggregator
    }


@pytest.mark.parametrize(
    "env, message",
    [({"FLARE_TRAIN_CONFIG": "{lr: 0.2}"}, "FLARE_TRAIN_CONFIG must be a JSON object"),
     ({"FLARE_AGGREGATOR_ARGS": "[0.03]"}, "FLARE_AGGREGATOR_ARGS must be a JSON object, got '[0.03]'"),
     ({"FLARE_AGGREGATOR": "fedsum"}, "FLARE_AGGREGATOR must be one of fedavg")],
    ids=["config-not-json", "args-not-object", "unknown-aggregator"],
)
def test_bad_recipe_settings_are_named(env, message):
    out = load_training_dag(**env)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-3000:]


def test_provision_dag_writes_kits_from_params(run_dag, xcom, tmp_path, sample_project_file):
    """The DAG file as shipped, run in Airflow with params from the trigger form."""
    workspace = tmp_path / "workspace"
    conf = {"project_file": str(sample_project_file), "workspace": str(workspace)}
    dag_run = run_dag((DAGS / "provision_federation.py").read_text(), "provision_federation", conf=conf)
    assert dag_run.state == "success"
    summary = xcom(dag_run, "provision")
    assert "hospital-a" in json.dumps(summary)
    kit = workspace / "hospital_federation" / "prod_00" / "airflow-server" / "startup" / "connections.json"
    assert kit.is_file()
    assert "PRIVATE KEY" not in json.dumps(summary)

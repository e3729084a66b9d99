"""Script apps in app.yaml, and the parts of the client API that need no worker process: a
describe task answered by a script (through the adapter the worker uses), and the API used
outside a task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from worker_support import GLOBAL, script_app

import site_agent.client as flare
from flare_provider.wire.app_config import load_app_config, parse_app_config, trainer_is_custom
from flare_provider.wire.bundles import BundleError
from site_agent.client import ClientAPIError
from site_agent.trainer import DataSummary, TaskContext
from site_agent.worker.script_app import ScriptError, ScriptTrainer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "apps" / "digits_script"


def app_yaml(**doc) -> str:
    return json.dumps({"name": "s", **doc})


def test_the_example_app_is_a_script_app():
    config = load_app_config(EXAMPLE)
    assert (config.script, config.trainer_path) == ("custom/train.py", "")
    assert config.script_args == ("--epochs", "3", "--lr", "0.1", "--momentum", "0.5", "--batch-size", "32")
    assert trainer_is_custom(config, ["app.yaml", "custom/train.py"])


@pytest.mark.parametrize("doc, message", [
    ({"script": "custom/train.py", "trainer": {"path": "site_agent.trainers.pytorch.ClassifierTrainer"}},
     "give either 'trainer' (a trainer class) or 'script' (a training script), not both"),
    ({}, "the app needs 'trainer' (a trainer class) or 'script' (a training script under custom/)"),
    ({"script": "train.py"}, "'script' must be a .py file under custom/ (e.g. custom/train.py), found 'train.py'"),
    ({"script": "custom/../train.py"}, "'script' must be a .py file under custom/"),
    ({"script": "/custom/train.py"}, "'script' must be a .py file under custom/"),
    ({"script": "custom/train.sh"}, "'script' must be a .py file under custom/"),
    ({"script": ["custom/train.py"]}, "'script' must be a .py file under custom/"),
    ({"script": "custom/train.py", "script_args": "--epochs 3"}, "'script_args' must be a list of command-line arguments"),
    ({"script": "custom/train.py", "script_args": [{"epochs": 3}]}, "'script_args' must be a list of command-line arguments"),
    ({"trainer": {"path": "site_agent.trainers.pytorch.ClassifierTrainer"}, "script_args": ["-v"]},
     "'script_args' belongs to a script app; a trainer takes 'trainer.args'"),
])
def test_app_yaml_names_a_trainer_or_a_script_under_custom(doc, message):
    with pytest.raises(BundleError) as err:
        parse_app_config(app_yaml(**doc), "app.yaml")
    assert message in str(err.value)


def test_a_script_the_app_does_not_bring_is_refused():
    config = parse_app_config(app_yaml(script="custom/train.py"))
    with pytest.raises(BundleError, match="script 'custom/train.py' is not a file of the app"):
        trainer_is_custom(config, ["app.yaml", "custom/other.py"])


def context(tmp_path: Path, kind: str, rank: int = 0) -> TaskContext:
    (tmp_path / "data").mkdir(exist_ok=True)
    return TaskContext(task_id="t", site="site-x", round=0, kind=kind, config={}, data_dir=tmp_path / "data",
                       work_dir=tmp_path / "work", app_dir=tmp_path / "app", device="cpu", rank=rank, world_size=rank + 1)


DESCRIBE = """
    import site_agent.client as flare
    model = flare.receive()
    assert flare.is_describe() and model.kind == "describe" and model.params == {}
    flare.send_summary(42, {"features": [64], "labels": list(range(10))})
"""


def test_a_describe_task_is_answered_by_send_summary(tmp_path):
    app = script_app(tmp_path / "app", DESCRIBE)
    trainer = ScriptTrainer(app, load_app_config(app), context(tmp_path, "describe"))
    assert trainer.describe() == DataSummary(42, {"features": [64], "labels": list(range(10))})

def test_ranks_other_than_0_need_not_answer(tmp_path):
    app = script_app(tmp_path / "app", DESCRIBE.replace("    flare.send_summary", "    if flare.rank() == 0: flare.send_summary"))
    other = ScriptTrainer(app, load_app_config(app), context(tmp_path, "describe", rank=1))
    assert other.describe() == DataSummary(0, {})
    assert ScriptTrainer(app, load_app_config(app), context(tmp_path, "describe")).describe().num_samples == 42


@pytest.mark.parametrize("script, error, message", [
    ("flare.send(params={'w': 1}, num_samples=1)", ClientAPIError,
     "send(): this is a describe task; answer it with send_summary(num_samples, schema)"),
    ("flare.send_summary(3, {'when': object()})", ClientAPIError, "send_summary(): schema must be JSON-like"),
    ("flare.send_summary(3, ['x'])", ClientAPIError, "send_summary(): schema must be a dict (JSON-like), got list"),
    ("flare.send_summary(-1)", ClientAPIError, "send_summary(): num_samples must not be negative, got -1"),
    ("pass", ScriptError, "ended without answering its describe task (call site_agent.client.send_summary"),
])
def test_a_describe_task_misanswered(tmp_path, script, error, message):
    app = script_app(tmp_path / "app", f"import site_agent.client as flare\n{script}\n")
    with pytest.raises(error) as err:
        ScriptTrainer(app, load_app_config(app), context(tmp_path, "describe")).describe()
    assert message in str(err.value)


def test_the_script_runs_in_surroundings_that_are_put_back(tmp_path):
    import os
    import sys

    app = script_app(tmp_path / "app", "import site_agent.client as flare\n"
                     "flare.send(params=flare.receive().params, num_samples=1)\n")
    before = (list(sys.argv), list(sys.path), os.getcwd())
    result = ScriptTrainer(app, load_app_config(app), context(tmp_path, "train")).train(GLOBAL, context(tmp_path, "train"))
    assert result.num_samples == 1 and sorted(result.weights) == ["b", "w"]
    assert (sys.argv, sys.path, os.getcwd()) == before


def test_the_api_outside_a_task_says_where_it_works():
    with pytest.raises(ClientAPIError, match="site_agent.client works inside a task only"):
        flare.receive()

"""Script apps through the real worker process (``python -m site_agent.worker`` on a task
folder, as the agent starts it): what a script is given, what it may send, and the messages
a task fails with when a script misuses the client API."""

from __future__ import annotations

import numpy as np
import pytest
from worker_support import GLOBAL, run_worker, script_app

TRAIN_OK = """
import site_agent.client as flare
model = flare.receive()
flare.send(params={k: v + 1 for k, v in model.params.items()}, num_samples=5)
"""


def test_a_script_gets_the_task_as_an_ordinary_main_and_its_answer_becomes_the_result(tmp_path):
    app = script_app(tmp_path / "app", """
        import os, sys
        from pathlib import Path
        import helper                                   # custom/helper.py: the script's folder is importable
        import site_agent.client as flare

        assert __name__ == "__main__"
        flare.init()
        model = flare.receive()
        assert model is flare.receive() and isinstance(model.params["w"], __import__("numpy").ndarray)
        info = flare.system_info()
        assert (info["site"], info["kind"], info["rank"], info["world_size"]) == ("site-x", "train", 0, 1)
        assert Path(os.getcwd()) == flare.work_dir() and flare.data_dir().is_dir() and flare.device() == "cpu"
        flare.report(0.5, loss=2.0)
        flare.log(loss=1.0)
        step = float(sys.argv[sys.argv.index("--step") + 1])
        flare.send(params={k: helper.shift(v, step) for k, v in model.params.items()}, num_samples=12,
                   metrics={"args": len(sys.argv), "round": model.round, "lr": model.config["lr"]})
        assert not flare.is_running() and flare.receive() is None
        sys.exit(0)                                     # a clean exit after answering is fine
    """, script_args=["--step", 2.5])
    (app / "custom" / "helper.py").write_text("def shift(value, step):\n    return value + step\n")
    run = run_worker(tmp_path / "task", app, config={"lr": 0.1})
    assert run.returncode == 0, run.log
    assert [e["event"] for e in run.events] == ["started", "progress", "progress", "finished"]
    assert [(e["progress"], e["metrics"]) for e in run.events[1:3]] == [(0.5, {"loss": 2.0}), (0.5, {"loss": 1.0})]
    assert run.info["num_samples"] == 12 and run.info["kind"] == "weights"
    assert run.info["metrics"] == {"args": 3.0, "round": 1.0, "lr": 0.1}
    result = run.result()
    assert all(np.array_equal(result[k], GLOBAL[k] + 2.5) for k in GLOBAL)


def test_torch_params_in_and_a_difference_out(tmp_path):
    app = script_app(tmp_path / "app", """
        import torch
        import site_agent.client as flare

        flare.init(tensor_format="torch")
        model = flare.receive()
        assert isinstance(model.params["w"], torch.Tensor)
        state = {k: v.clone() for k, v in model.params.items()}
        flare.send(params={k: torch.full_like(v, 0.5) for k, v in state.items()}, num_samples=3, is_difference=True)
        for v in state.values():  # changed after sending: what was sent stays as it was
            v.add_(100)
    """)
    run = run_worker(tmp_path / "train", app)
    assert run.returncode == 0, run.log
    assert run.info["kind"] == "difference"
    assert all(np.array_equal(v, np.full_like(GLOBAL[k], 0.5)) for k, v in run.result().items())


def test_evaluate_and_initialize_tasks(tmp_path):
    app = script_app(tmp_path / "app", """
        import numpy as np
        import site_agent.client as flare

        model = flare.receive()
        if flare.is_initialize():
            assert model.params == {}
            flare.send(params={"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)})
        elif flare.is_evaluate():
            flare.send_metrics({"mean": float(sum(v.sum() for v in model.params.values()))}, num_samples=4, extra=1)
    """)
    evaluate = run_worker(tmp_path / "evaluate", app, kind="evaluate")
    assert evaluate.returncode == 0, evaluate.log
    assert evaluate.info["kind"] == "metrics" and evaluate.info["num_samples"] == 4
    assert evaluate.info["metrics"] == {"mean": float(sum(v.sum() for v in GLOBAL.values())), "extra": 1.0}

    initialize = run_worker(tmp_path / "initialize", app, kind="initialize", weights=None)
    assert initialize.returncode == 0, initialize.log
    assert initialize.info["kind"] == "weights"
    assert np.array_equal(initialize.result()["w"], np.ones((2, 3), np.float32))


def test_a_describe_task_is_answered_with_a_summary(tmp_path):
    app = script_app(tmp_path / "app", """
        import site_agent.client as flare

        if flare.is_describe():
            flare.send_summary(150, {"features": [64], "labels": list(range(10))})
    """)
    run = run_worker(tmp_path / "task", app, kind="describe")
    assert run.returncode == 0, run.log
    assert run.info["summary"] == {"num_samples": 150, "schema": {"features": [64], "labels": list(range(10))}}


def test_a_loop_in_the_style_of_is_running_ends_after_its_one_answer(tmp_path):
    app = script_app(tmp_path / "app", """
        import site_agent.client as flare

        flare.init()
        rounds = 0
        while flare.is_running():
            model = flare.receive()
            rounds += 1
            assert rounds == 1
            flare.send(params=model.params, num_samples=1)
    """)
    run = run_worker(tmp_path / "task", app)
    assert run.returncode == 0, run.log


def test_every_rank_starts_from_the_global_model_and_only_rank_0_answers(tmp_path):
    app = script_app(tmp_path / "app", """
        import site_agent.client as flare

        model = flare.receive()
        assert flare.world_size() == 2 and model.params["w"].sum() == 15
        flare.send(params={k: v + flare.rank() + 1 for k, v in model.params.items()}, num_samples=10 + flare.rank())
        assert not flare.is_running()
    """)
    run = run_worker(tmp_path / "task", app, world_size=2)
    assert run.returncode == 0, run.log
    assert run.info["num_samples"] == 10
    assert np.array_equal(run.result()["w"], GLOBAL["w"] + 1)


MISUSE = {
    "no answer": ("import site_agent.client as flare\nflare.receive()\n",
                  "the script custom/train.py ended without answering its train task "
                  "(call site_agent.client.send(params=..., num_samples=...))"),
    "twice": (TRAIN_OK + "flare.send(params=model.params, num_samples=5)\n",
              "ClientAPIError: send(): the task was already answered; a script sends once per task"),
    "metrics after the answer": (TRAIN_OK + "flare.send_metrics({'acc': 1.0})\n",
                                 "ClientAPIError: send_metrics(): the task was already answered"),
    "a model, not params": ("import site_agent.client as flare\nclass Net:\n    def state_dict(self): return {}\n"
                            "flare.send(params=Net(), num_samples=1)\n",
                            "ClientAPIError: send(): params must be a dict of name -> tensor, got Net "
                            "(send model.state_dict(), not the model)"),
    "a list as tensor": ("import site_agent.client as flare\nflare.send(params={'w': [1, 2]}, num_samples=1)\n",
                         "ClientAPIError: send(): params['w'] is a list, expected a numpy array or torch tensor"),
    "no num_samples": ("import site_agent.client as flare\nflare.send(params=flare.receive().params)\n",
                       "ClientAPIError: send(): num_samples is required for a train task"),
    "text num_samples": ("import site_agent.client as flare\nflare.send(params=flare.receive().params, num_samples='9')\n",
                         "ClientAPIError: send(): num_samples must be a whole number, got '9'"),
    "text metric": ("import site_agent.client as flare\n"
                    "flare.send(params=flare.receive().params, num_samples=1, metrics={'acc': 'high'})\n",
                    "ClientAPIError: send(): metric 'acc' must be a number, got str"),
    "metrics for training": ("import site_agent.client as flare\nflare.send_metrics({'acc': 1.0})\n",
                             "ClientAPIError: send_metrics(): this is a train task; send_metrics answers evaluate "
                             "tasks (answer it with send(params=..., num_samples=...))"),
    "summary for training": ("import site_agent.client as flare\nflare.send_summary(3, {})\n",
                             "ClientAPIError: send_summary(): this is a train task; send_summary answers describe tasks"),
    "unknown format": ("import site_agent.client as flare\nflare.init(tensor_format='jax')\n",
                       "ClientAPIError: init(): tensor_format must be one of ('numpy', 'torch'), got 'jax'"),
    "a changed shape": ("import numpy as np, site_agent.client as flare\n"
                        "flare.send(params={'w': np.zeros((3, 2), np.float32), 'b': np.zeros(3, np.float32)}, num_samples=1)\n",
                        "tensor 'w' is F32[3, 2], the global model has F32[2, 3]"),
    "exit status": ("import sys\nsys.exit(3)\n", "the script custom/train.py exited with status 3 without answering its task"),
    "an exception": ("raise ValueError('no data here')\n", "ValueError: no data here"),
}


@pytest.mark.parametrize("case", sorted(MISUSE))
def test_a_misused_client_api_fails_the_task_with_a_message_saying_how(case, tmp_path):
    script, message = MISUSE[case]
    run = run_worker(tmp_path / "task", script_app(tmp_path / "app", script))
    assert run.returncode == 1
    assert message in run.error, run.error
    assert not run.paths.result_info.exists()


def test_params_sent_for_an_evaluate_task_are_refused(tmp_path):
    run = run_worker(tmp_path / "evaluate", script_app(tmp_path / "app", TRAIN_OK), kind="evaluate")
    assert run.returncode == 1
    assert run.error.startswith("ClientAPIError: send(): an evaluate task returns metrics only, but params were given")


def test_a_site_without_custom_code_runs_no_script(tmp_path):
    marker = tmp_path / "ran"
    app = script_app(tmp_path / "app", f"open({str(marker)!r}, 'w').close()\n")
    run = run_worker(tmp_path / "task", app, allow_custom_code=False)
    assert run.returncode == 1
    assert run.error == "this app brings custom code, which this site does not allow (site.yaml: allow_custom_code)"
    assert not marker.exists()


def test_the_example_script_describes_its_data_as_the_built_in_trainer_does(tmp_path):
    """A federation may mix the example script app with the built-in trainer: their data checks must agree."""
    from worker_support import REPO

    from site_agent.datasets.digits import summarize_split, write_site_partitions

    data = tmp_path / "data"
    write_site_partitions([data], non_iid=False)
    run = run_worker(tmp_path / "task", REPO / "examples" / "apps" / "digits_script", kind="describe", weights={},
                     data_dir=data)
    assert run.returncode == 0, run.log
    built_in = summarize_split(data)
    assert run.info["summary"] == {"num_samples": built_in.num_samples, "schema": built_in.schema}

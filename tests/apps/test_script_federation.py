"""A script app in a real federation: the digits training script (examples/apps/digits_script)
trained by FedAvg across three real agents, against the built-in trainer's digits app in the
same rounds on the same sites. The run starts without an initial model, so one site's script
also answers the initialize task."""

from __future__ import annotations

import runpy
import uuid
from pathlib import Path

import numpy as np
import torch
import yaml
from conftest import EXAMPLE_APPS

from flare_provider.client import load_caller_kit
from flare_provider.federation.records import RoundRecord, RunSpec
from flare_provider.federation.scatter_gather import ScatterGatherRun
from flare_provider.snapshots import SnapshotStore
from site_agent.datasets.digits import holdout_set
from site_agent.trainers.pytorch import build_model

ROUNDS = 3


def run_fedavg(fed, app_name: str, store_root: Path) -> tuple[dict[str, np.ndarray], list[RoundRecord]]:
    """A whole FedAvg run of ``app_name``; the final global model and the round history."""
    spec = RunSpec(federation=f"fed_{app_name}", run_id=uuid.uuid4().hex, app_name=app_name, sites=fed.sites,
                   num_rounds=ROUNDS, min_clients=3, wait_time_after_min_received=30.0, train_timeout=120.0,
                   status_poll_interval=0.5)
    with ScatterGatherRun(spec, load_caller_kit(fed.server_kit), SnapshotStore(f"file://{store_root}")) as run:
        progress = run.restore()
        while progress.round < ROUNDS:
            flight = run.scatter(progress)
            progress = run.finish_round(progress, flight, run.gather(flight))
        return {k: np.array(v) for k, v in progress.weights.items()}, progress.history


def holdout_accuracy(model: torch.nn.Module, weights: dict[str, np.ndarray]) -> float:
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    x, y = holdout_set(seed=0)  # no site trained on these
    with torch.no_grad():
        return float((model.eval()(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_the_digits_script_trains_across_three_agents_as_well_as_the_built_in_trainer(script_federation, tmp_path):
    fed = script_federation
    script_weights, history = run_fedavg(fed, "digits_script", tmp_path / "script")
    builtin_weights, _ = run_fedavg(fed, "digits", tmp_path / "builtin")

    # Every site's script answered every round, with the metrics it sent.
    assert [h.accepted for h in history] == [list(fed.sites)] * ROUNDS
    assert all(h.num_samples and {"val_accuracy", "val_loss"} <= set(h.metrics) for h in history), history
    net = runpy.run_path(str(EXAMPLE_APPS / "digits_script" / "custom" / "train.py"), run_name="digits_script")["Net"]()
    assert sorted(script_weights) == sorted(net.state_dict())
    builtin_args = yaml.safe_load((EXAMPLE_APPS / "digits" / "app.yaml").read_text())["trainer"]["args"]
    accuracy = {"script": holdout_accuracy(net, script_weights),
                "built-in": holdout_accuracy(build_model(builtin_args["model"]), builtin_weights)}
    print(f"\nheld-out accuracy after {ROUNDS} FedAvg rounds on 3 non-IID sites: {accuracy}")
    assert accuracy["script"] >= 0.85, accuracy
    assert accuracy["script"] >= accuracy["built-in"] - 0.05, accuracy

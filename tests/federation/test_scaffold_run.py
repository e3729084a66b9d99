"""SCAFFOLD with real agents (mutual TLS through the relay, real PyTorch training): it
converges on a strongly non-IID split of the digits, at least as well as FedAvg in the
same rounds, and a site's control variate survives a restart of its agent."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file as load_torch

from flare_provider.client import load_caller_kit
from flare_provider.federation.records import RunSpec
from flare_provider.federation.scatter_gather import ScatterGatherRun
from flare_provider.files import safe_name
from flare_provider.snapshots import SnapshotStore
from site_agent.datasets.digits import load_digits_arrays
from site_agent.site_settings import load_site_settings
from site_agent.trainer import TaskContext
from site_agent.trainers.pytorch import ClassifierTrainer, build_model

APP_NAME = "digits_scaffold"
TRAINER_ARGS = {
    "model": [{"layer": "Linear", "in_features": 64, "out_features": 32}, "ReLU",
              {"layer": "Linear", "in_features": 32, "out_features": 10}],
    "data": {"train": "train.npz", "test": "test.npz"},
    "epochs": 3, "lr": 0.05, "batch_size": 16, "seed": 0,
}
# Each site sees 3 or 4 of the 10 classes and nothing of the others.
CLASSES = {"site-1": (0, 1, 2, 3), "site-2": (4, 5, 6), "site-3": (7, 8, 9)}
ROUNDS = 6


@pytest.fixture(scope="module")
def fed(digits_federation, tmp_path_factory):
    """The fixture's federation with its data split by class instead, and the app deployed."""
    x, y = load_digits_arrays()
    order = np.random.default_rng(3).permutation(len(x))
    holdout, pool = order[: len(x) // 5], order[len(x) // 5 :]
    for site, classes in CLASSES.items():
        mine = pool[np.isin(y[pool], classes)]
        cut = len(mine) // 5
        folder = digits_federation.data_dir(site)
        np.savez(folder / "test.npz", x=x[mine[:cut]], y=y[mine[:cut]])
        np.savez(folder / "train.npz", x=x[mine[cut:]], y=y[mine[cut:]])
    app = tmp_path_factory.mktemp("app")
    (app / "app.yaml").write_text(yaml.safe_dump({"name": APP_NAME, "trainer": {
        "path": "site_agent.trainers.pytorch.ClassifierTrainer", "args": TRAINER_ARGS}}))
    digits_federation.deploy_app(app)
    digits_federation.holdout = (x[holdout], y[holdout])
    return digits_federation


def make_run(fed, store_root: Path, aggregator: str, run_id: str | None = None, **overrides) -> ScatterGatherRun:
    spec = dict(federation="scaffold_test", run_id=run_id or uuid.uuid4().hex, app_name=APP_NAME, sites=fed.sites,
                num_rounds=ROUNDS, min_clients=3, wait_time_after_min_received=30.0, train_timeout=120.0,
                aggregator=aggregator)
    spec.update(overrides)
    return ScatterGatherRun(RunSpec(**spec), load_caller_kit(fed.server_kit), SnapshotStore(f"file://{store_root}"))


def accuracy(weights, holdout) -> float:
    model = build_model(TRAINER_ARGS["model"])
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    with torch.no_grad():
        return float((model(torch.from_numpy(holdout[0])).argmax(1).numpy() == holdout[1]).mean())


def site_state_dir(fed, site: str, run: ScatterGatherRun) -> Path:
    work_dir = load_site_settings(fed.kits[site]).work_dir
    return work_dir / "state" / safe_name(APP_NAME) / safe_name(run.spec.run_key)


def run_to_the_end(fed, store_root: Path, aggregator: str) -> list[float]:
    """A whole run with ``aggregator``; the held-out accuracy of the global model after each round."""
    with make_run(fed, store_root, aggregator) as run:
        progress = run.restore()
        curve = []
        while progress.round < ROUNDS:
            flight = run.scatter(progress)
            progress = run.finish_round(progress, flight, run.gather(flight))
            assert progress.history[-1].accepted == list(fed.sites)
            curve.append(round(accuracy(progress.weights, fed.holdout), 3))
        if aggregator == "scaffold":
            # The server's c travelled in the snapshots and the sites kept their c_i.
            snapshot = run.store.latest("scaffold_test", run.spec.run_id)
            server_c = run.store.load_server_state(snapshot)
            assert sorted(server_c) == ["c/0.bias", "c/0.weight", "c/2.bias", "c/2.weight"]
            assert max(float(np.abs(c).max()) for c in server_c.values()) > 1e-3
            for site in fed.sites:
                kept = sorted(p.name for p in site_state_dir(fed, site, run).iterdir())
                assert kept == [f"scaffold-c_i-r{ROUNDS - 1:06d}.safetensors", f"scaffold-c_i-r{ROUNDS:06d}.safetensors"]
    return curve


def test_scaffold_converges_on_a_strongly_non_iid_split_and_does_at_least_as_well_as_fedavg(fed, tmp_path):
    curves = {name: run_to_the_end(fed, tmp_path / name, name) for name in ("fedavg", "scaffold")}
    print(f"\nheld-out accuracy per round, {ROUNDS} rounds, classes per site {CLASSES}:")
    for name, curve in curves.items():
        print(f"  {name:8s} {curve}")
    assert curves["scaffold"][-1] >= 0.8, curves
    assert curves["scaffold"][-1] >= curves["fedavg"][-1], curves


def test_a_restarted_site_keeps_its_control_variate(fed, tmp_path):
    site = "site-2"
    run_id = uuid.uuid4().hex
    with make_run(fed, tmp_path / "snapshots", "scaffold", run_id=run_id, num_rounds=2) as run:
        progress = run.restore()
        flight = run.scatter(progress)
        progress = run.finish_round(progress, flight, run.gather(flight))
        x1 = {k: np.array(v) for k, v in progress.weights.items()}
        c1 = {k: np.array(v) for k, v in run.aggregator.state()[0].items()}
        state = site_state_dir(fed, site, run)
    c_i_1 = state / "scaffold-c_i-r000001.safetensors"
    saved_before = c_i_1.read_bytes()

    agent = fed.agent(site)
    old_pid = agent.proc.pid
    agent.stop()
    assert not agent.alive
    agent.start()
    assert agent.alive and agent.proc.pid != old_pid

    with make_run(fed, tmp_path / "snapshots", "scaffold", run_id=run_id, num_rounds=2) as run:
        progress = run.restore()
        assert progress.round == 1
        flight = run.scatter(progress)
        progress = run.finish_round(progress, flight, run.gather(flight))
        assert progress.history[-1].accepted == list(fed.sites)
    assert c_i_1.read_bytes() == saved_before  # round 2 started from it and left it in place
    after_restart = load_torch(str(state / "scaffold-c_i-r000002.safetensors"))

    # Round 2 of site-2 done again here, from the same x, c and data: with the c_i the agent
    # kept on disk it gives the agent's c_i exactly; starting from c_i = 0 it would not.
    def round_two(state_dir: Path) -> dict[str, torch.Tensor]:
        trainer = ClassifierTrainer(**TRAINER_ARGS)
        sent = {**x1, **{f"scaffold.c/{k[2:]}": v for k, v in c1.items()}}
        ctx = TaskContext(task_id="again", site=site, round=2, kind="train", config={}, data_dir=fed.data_dir(site),
                          work_dir=tmp_path, app_dir=tmp_path, device="cpu", state_dir=state_dir)
        trainer.train({k: torch.from_numpy(v) for k, v in sent.items()}, ctx)
        return load_torch(str(state_dir / "scaffold-c_i-r000002.safetensors"))

    kept = tmp_path / "kept"
    kept.mkdir()
    shutil.copy(c_i_1, kept / c_i_1.name)
    with_kept, from_zero = round_two(kept), round_two(tmp_path / "zero")
    for name, value in after_restart.items():
        torch.testing.assert_close(with_kept[name], value, rtol=0, atol=1e-5)
    assert max(float((from_zero[k] - after_restart[k]).abs().max()) for k in after_restart) > 1e-3

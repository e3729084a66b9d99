"""The built-in PyTorch trainer, the example apps and the digits data, with real PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from runtime_support import (
    EXAMPLE_APPS,
    SITE,
    bundle_file,
    new_store,
    provision_federation,
    site_settings,
    wait_finished,
)
from safetensors import safe_open
from safetensors.torch import load_file

from site_agent.datasets.digits import holdout_set, load_digits_arrays, write_site_partitions
from site_agent.errors import TaskRejected
from site_agent.runtime.task_manager import TaskManager
from site_agent.runtime.task_records import TaskSpec
from site_agent.trainer import TaskContext
from site_agent.trainers.pytorch import ClassifierTrainer, build_model
from site_agent.worker.task_runner import RESULT_KIND_KEY
from site_agent.worker.weights import save_weights

DIGITS_ARGS = yaml.safe_load((EXAMPLE_APPS / "digits" / "app.yaml").read_text())["trainer"]["args"]
GPUS = (0,) if torch.cuda.is_available() else ()  # on a GPU machine the same tests run on CUDA


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return provision_federation(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def store(fed, tmp_path_factory):
    base = tmp_path_factory.mktemp("store")
    store = new_store(fed, base / "apps")
    for app in ("digits", "digits_custom"):
        store.deploy(bundle_file(fed, EXAMPLE_APPS / app, base / f"{app}.zip"))
    return store


@pytest.fixture(scope="module")
def site_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("site-data")
    write_site_partitions([folder], non_iid=False, seed=0)
    return folder


def holdout_accuracy(weights: dict[str, torch.Tensor]) -> float:
    model = build_model(DIGITS_ARGS["model"])
    model.load_state_dict(weights)
    x, y = holdout_set(seed=0)
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1) == torch.from_numpy(y)).float().mean())


def context(data_dir: Path, tmp_path: Path, round: int = 0, **config) -> TaskContext:
    return TaskContext(
        task_id="t", site=SITE, round=round, kind="train", config=config, data_dir=data_dir,
        work_dir=tmp_path, app_dir=EXAMPLE_APPS / "digits", device="cpu",
    )


def test_digits_training_task_improves_the_global_model(store, site_data, tmp_path):
    settings = site_settings(tmp_path / "site", gpus=GPUS)
    tasks = TaskManager(settings.__class__(**{**settings.__dict__, "data_dir": site_data}), store, SITE)
    tasks.start()
    try:
        initial = ClassifierTrainer(**DIGITS_ARGS).initial_weights()
        save_weights(tmp_path / "global.safetensors", initial)
        tasks.submit(TaskSpec("digits-r0", "digits", None, 0, config={"epochs": 4}), tmp_path / "global.safetensors")
        done = wait_finished(tasks, "digits-r0", timeout=120)
        assert done.status == "succeeded", done.error
        assert done.gpus == list(GPUS)
        assert done.num_samples > 1000 and done.metrics["train_accuracy"] > 0.8
        path, _ = tasks.result_file("digits-r0")
        trained = load_file(path)
        before, after = holdout_accuracy(initial), holdout_accuracy(trained)
        assert before < 0.3 and after > 0.85, (before, after)

        # the same global model, evaluated at the site
        save_weights(tmp_path / "trained.safetensors", trained)
        tasks.submit(TaskSpec("digits-eval", "digits", None, 1, kind="evaluate"), tmp_path / "trained.safetensors")
        evaluated = wait_finished(tasks, "digits-eval", timeout=120)
        assert evaluated.status == "succeeded", evaluated.error
        assert evaluated.metrics["accuracy"] == pytest.approx(done.metrics["val_accuracy"])
        assert evaluated.num_samples > 0 and not evaluated.result_available
    finally:
        tasks.close()


def test_byoc_app_runs_with_opt_in_and_sends_differences(store, site_data, tmp_path):
    settings = site_settings(tmp_path / "site", gpus=GPUS, allow_custom_code=True)
    tasks = TaskManager(settings.__class__(**{**settings.__dict__, "data_dir": site_data}), store, SITE)
    tasks.start()
    try:
        save_weights(tmp_path / "empty.safetensors", {})  # round 0: the site initialises the model
        tasks.submit(TaskSpec("cnn-r0", "digits_custom", None, 0), tmp_path / "empty.safetensors")
        first = wait_finished(tasks, "cnn-r0", timeout=120)
        assert first.status == "succeeded", first.error
        path, _ = tasks.result_file("cnn-r0")
        global_weights = load_file(path)
        save_weights(tmp_path / "global.safetensors", global_weights)
        tasks.submit(TaskSpec("cnn-r1", "digits_custom", None, 1), tmp_path / "global.safetensors")
        second = wait_finished(tasks, "cnn-r1", timeout=120)
        assert second.status == "succeeded", second.error
        path, _ = tasks.result_file("cnn-r1")
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()[RESULT_KIND_KEY] == "difference"
        diff = load_file(path)
        assert diff.keys() == global_weights.keys()
        assert any(float(d.abs().max()) > 0 for d in diff.values())
    finally:
        tasks.close()

    closed_site = TaskManager(site_settings(tmp_path / "closed", allow_custom_code=False), store, SITE)
    closed_site.start()
    try:
        save_weights(tmp_path / "w.safetensors", {})
        with pytest.raises(TaskRejected, match="custom code"):
            closed_site.submit(TaskSpec("cnn-x", "digits_custom", None, 0), tmp_path / "w.safetensors")
    finally:
        closed_site.close()


def test_same_inputs_give_the_same_weights_on_cpu(site_data, tmp_path):
    trainer = ClassifierTrainer(**DIGITS_ARGS)
    start = trainer.initial_weights()
    one = trainer.train(dict(start), context(site_data, tmp_path, round=3)).weights
    two = ClassifierTrainer(**DIGITS_ARGS).train(dict(start), context(site_data, tmp_path, round=3)).weights
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    other_round = trainer.train(dict(start), context(site_data, tmp_path, round=4)).weights
    assert not all(torch.equal(one[k], other_round[k]) for k in one)  # the round changes the shuffle


def test_fedprox_keeps_the_update_near_the_global_model(site_data, tmp_path):
    trainer = ClassifierTrainer(**DIGITS_ARGS)
    start = trainer.initial_weights()

    def drift(mu: float) -> float:
        result = trainer.train(dict(start), context(site_data, tmp_path, fedprox_mu=mu, epochs=2))
        assert result.metrics["train_accuracy"] > 0.3
        return sum(float(((result.weights[k] - start[k]) ** 2).sum()) for k in start) ** 0.5

    free, proximal = drift(0.0), drift(0.1)
    assert proximal < 0.8 * free, (free, proximal)


def test_round_config_is_checked(site_data, tmp_path):
    trainer = ClassifierTrainer(**DIGITS_ARGS)
    with pytest.raises(ValueError, match="epochs must be a whole number"):
        trainer.train({}, context(site_data, tmp_path, epochs="many"))
    with pytest.raises(ValueError, match="fedprox_mu must be a number >= 0"):
        trainer.train({}, context(site_data, tmp_path, fedprox_mu=-1))


def test_model_spec_is_an_allow_list(site_data, tmp_path):
    with pytest.raises(ValueError, match="'Transformer' is not an allowed layer"):
        build_model([{"layer": "Transformer"}])
    with pytest.raises(ValueError, match=r"model layer 0 \(Linear\)"):
        build_model([{"layer": "Linear", "in_features": 64}])
    with pytest.raises(ValueError, match="must be a path inside"):
        ClassifierTrainer(**{**DIGITS_ARGS, "data": {"train": "../../etc/passwd"}}).train({}, context(site_data, tmp_path))
    with pytest.raises(ValueError, match="do not fit the model"):
        ClassifierTrainer(**DIGITS_ARGS).train({"0.weight": torch.zeros(3, 3)}, context(site_data, tmp_path))


def test_digits_partitions_are_non_iid_and_disjoint(tmp_path):
    folders = [tmp_path / name for name in ("a", "b", "c")]
    summary = write_site_partitions(folders, non_iid=True, seed=0)
    x_all, _ = load_digits_arrays()  # no two digits images are identical, so rows identify samples
    holdout_x, _ = holdout_set(seed=0)
    seen = {tuple(r) for r in holdout_x.tolist()}
    for folder in folders:
        for split in ("train", "test"):
            with np.load(folder / f"{split}.npz", allow_pickle=False) as npz:
                x, y = npz["x"], npz["y"]
            assert x.dtype == np.float32 and x.shape[1] == 64 and y.dtype == np.int64
            assert 0.0 <= x.min() and x.max() <= 1.0
            rows = {tuple(r) for r in x.tolist()}
            assert not rows & seen  # no sample in two places, none from the held-out set
            seen |= rows
    assert len(seen) == len(x_all)
    shares = np.array([s["labels"] for s in summary.values()], dtype=float)
    shares /= shares.sum(axis=0, keepdims=True)
    assert shares.max() > 0.6  # some site holds most of some label: skewed
    iid = write_site_partitions([tmp_path / "x", tmp_path / "y"], non_iid=False, seed=0)
    counts = [s["train"] for s in iid.values()]
    assert abs(counts[0] - counts[1]) <= 1

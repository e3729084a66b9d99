"""The baselines the demo measures the federated model against (``site_agent.worker.baseline``)
and the learning-rate schedule that spans a federated run: real digits data, real PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from site_agent.datasets.digits import write_site_partitions
from site_agent.trainer import TaskContext
from site_agent.trainers.pytorch import ClassifierTrainer
from site_agent.trainers.schedules import run_steps, scheduled_lr
from site_agent.worker.baseline import epochs_per_round, train_centralized, train_local_only

APP = Path(__file__).resolve().parents[2] / "examples" / "apps" / "digits"
APP_ARGS = yaml.safe_load((APP / "app.yaml").read_text())["trainer"]["args"]
CONFIG = {"lr": 0.2, "momentum": 0.9, "lr_schedule": "cosine"}


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("digits")
    folders = [root / f"site-{i}" for i in (1, 2, 3)]
    write_site_partitions(folders, non_iid=True, seed=0)
    return folders


def train(trainer: ClassifierTrainer, weights, data_dir: Path, work: Path, round_number: int = 1, **config):
    ctx = TaskContext(task_id="t", site="s", round=round_number, kind="train", config=config, data_dir=data_dir,
                      work_dir=work, app_dir=APP, device="cpu")
    return trainer.train(weights, ctx).weights


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_site_alone_trains_in_one_continuous_run(sites, tmp_path):
    run = train_local_only(APP, sites[0], 4, CONFIG)
    # The trainer reported once per epoch of a single 4-epoch run: never starting over.
    assert run.epochs == 4 and run.progress == [0.25, 0.5, 0.75, 1.0]
    trainer = ClassifierTrainer(**APP_ARGS)
    start = trainer.initial_weights()
    # One train call of 4 epochs: one optimizer, one shuffling stream, one schedule.
    assert same(run.weights, train(trainer, start, sites[0], tmp_path, epochs=4, **CONFIG))
    # Not the pieces of old, whose optimizer (momentum) and shuffling restart every piece.
    first = train(trainer, start, sites[0], tmp_path, 1, epochs=2, round=1, num_rounds=2, **CONFIG)
    pieces = train(trainer, first, sites[0], tmp_path, 2, epochs=2, round=2, num_rounds=2, **CONFIG)
    assert not same(run.weights, pieces)


def test_centralized_pools_every_site_in_one_run(sites):
    run = train_centralized(APP, sites, 3, CONFIG)
    sizes = [len(np.load(folder / "train.npz")["y"]) for folder in sites]
    assert run.num_samples == sum(sizes) and run.progress == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert run.summary() == {"epochs": 3, "num_samples": sum(sizes), "progress": run.progress}


def test_baselines_train_the_epochs_a_site_trains_in_the_federation():
    assert epochs_per_round(APP) == APP_ARGS["epochs"]
    assert epochs_per_round(APP, {"epochs": 1, "lr": 0.2}) == 1


def test_bad_baseline_input_is_named(sites, tmp_path):
    with pytest.raises(ValueError, match="epochs must be a whole number >= 1, got 0"):
        train_local_only(APP, sites[0], 0)
    with pytest.raises(ValueError, match="epochs in the round config must be a whole number >= 1"):
        epochs_per_round(APP, {"epochs": "two"})
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        train_centralized(APP, [sites[0], tmp_path / "nowhere"], 1)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        train_local_only(APP, sites[0], 1, {"lr_schedule": "linear"})


def test_cosine_schedule_spans_the_whole_run():
    per_round = 10
    assert run_steps({"round": 2, "num_rounds": 3}, per_round) == (10, 30)
    assert run_steps({}, per_round) == (0, 10)  # no run around it: the call is the run
    rates = [scheduled_lr("cosine", 0.2, step, 30) for step in range(30)]
    assert rates[0] == 0.2 and all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] < 0.001
    assert scheduled_lr("constant", 0.2, 29, 30) == 0.2
    for bad in ({"round": 4, "num_rounds": 3}, {"round": 0, "num_rounds": 3}, {"num_rounds": 3}):
        with pytest.raises(ValueError, match="round"):
            run_steps(bad, per_round)


def test_the_last_round_of_a_cosine_run_moves_the_model_least(sites, tmp_path):
    """The round number in the config places a round on the run's curve: from the same
    start, round 1 of 15 trains at full rate, round 15 of 15 near zero."""
    trainer = ClassifierTrainer(**APP_ARGS)
    start = trainer.initial_weights()

    def moved(round_number: int) -> float:
        after = train(trainer, start, sites[1], tmp_path, round_number, epochs=1, round=round_number, num_rounds=15,
                      **CONFIG)
        return sum(float((after[k] - start[k]).abs().sum()) for k in start)

    first, last = moved(1), moved(15)
    assert last < first / 20, (first, last)

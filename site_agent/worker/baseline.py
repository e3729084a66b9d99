"""Running an app's trainer in this process, without a federation, for comparisons.

How a model does on a data folder (``evaluate_weights``), and the models a federated one
is measured against, each trained as its owner would train it: one continuous run of as
many epochs as each site trains in the federation, with the app's own trainer and settings
(optimizer, learning rate and its schedule, batch size), from the app's initial model.

- ``train_local_only``: one site's training data alone;
- ``train_centralized``: every site's training data pooled in one place.

A continuous run is one call of the trainer's ``train``: one optimizer, whose momentum is
never reset, one shuffling stream, and a learning-rate schedule that spans all its epochs.
The demo and the tests use this module; agents never do.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flare_provider.files import atomic_file
from flare_provider.wire.app_config import load_app_config

from ..trainer import EvalResult, TaskContext
from .task_runner import load_trainer_class
from .weights import convert_weights


@dataclass
class BaselineRun:
    """A model trained outside the federation, and how it was trained."""

    weights: dict[str, Any]
    epochs: int  # epochs of the one run
    num_samples: int  # training samples it saw each epoch
    # What the one train call reported, in order: k / epochs after epoch k for the built-in
    # trainer, the sign of one run (pieces would start over at 1 / their epochs).
    progress: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "num_samples": self.num_samples, "progress": self.progress}


def _trainer(app_dir: Path):
    config = load_app_config(app_dir)
    cls = load_trainer_class(config.trainer_path, app_dir, allow_custom_code=True)
    return cls(**config.trainer_args), getattr(cls, "tensor_format", "numpy")


def _context(app_dir: Path, data_dir: Path, work_dir: Path, kind: str, config: dict, reporter=None) -> TaskContext:
    return TaskContext(
        task_id=f"local-{kind}", site="local", round=1, kind=kind, config=config, data_dir=Path(data_dir),
        work_dir=work_dir, app_dir=Path(app_dir), device="cpu", _reporter=reporter,
    )


def epochs_per_round(app_dir: str | Path, config: Mapping[str, Any] | None = None) -> int:
    """The epochs a site trains each round: the round config's ``epochs``, else ``app.yaml``'s."""
    app = load_app_config(Path(app_dir))
    epochs = (config or {}).get("epochs", app.trainer_args.get("epochs"))
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        where = "the round config" if config and "epochs" in config else f"{Path(app_dir) / 'app.yaml'} (trainer args)"
        raise ValueError(f"epochs in {where} must be a whole number >= 1, got {epochs!r}")
    return epochs


def evaluate_weights(app_dir: str | Path, weights: Mapping[str, Any], data_dir: str | Path) -> dict[str, float]:
    """The trainer's ``evaluate`` metrics of ``weights`` on ``data_dir``'s test data."""
    trainer, tensor_format = _trainer(Path(app_dir))
    with tempfile.TemporaryDirectory() as work:
        result: EvalResult = trainer.evaluate(
            convert_weights(weights, tensor_format), _context(app_dir, data_dir, Path(work), "evaluate", {})
        )
    return dict(result.metrics)


def train_local_only(
    app_dir: str | Path, data_dir: str | Path, epochs: int, config: Mapping[str, Any] | None = None
) -> BaselineRun:
    """One continuous run of ``epochs`` epochs on ``data_dir``'s training data alone."""
    return _train_continuously(Path(app_dir), Path(data_dir), epochs, config)


def train_centralized(
    app_dir: str | Path, data_dirs: Sequence[str | Path], epochs: int, config: Mapping[str, Any] | None = None
) -> BaselineRun:
    """One continuous run of ``epochs`` epochs on the training data of every folder, pooled."""
    trainer, _ = _trainer(Path(app_dir))
    train_file = getattr(trainer, "data", {}).get("train", "train.npz")
    with tempfile.TemporaryDirectory() as pooled:
        _pool_npz([Path(d) / train_file for d in data_dirs], Path(pooled) / train_file)
        return _train_continuously(Path(app_dir), Path(pooled), epochs, config)


def _pool_npz(files: Sequence[Path], into: Path) -> None:
    """The arrays ``x`` and ``y`` of ``files``, one after the other, written to ``into``."""
    if not files:
        raise ValueError("centralized training needs at least one data folder")
    xs, ys = [], []
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"training data {path} not found")
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz or "y" not in npz:
                raise ValueError(f"training data {path} must hold arrays named 'x' and 'y'")
            xs.append(npz["x"])
            ys.append(npz["y"])
    into.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(into) as f:
        np.savez(f, x=np.concatenate(xs), y=np.concatenate(ys))


def _train_continuously(app_dir: Path, data_dir: Path, epochs: int, config: Mapping[str, Any] | None) -> BaselineRun:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a whole number >= 1, got {epochs!r}")
    trainer, tensor_format = _trainer(app_dir)
    progress: list[float] = []
    # No round and no num_rounds: to the trainer this call is a whole run, so a schedule
    # such as the cosine learning rate spans all of its epochs.
    run_config = {k: v for k, v in (config or {}).items() if k not in ("round", "num_rounds")}
    run_config["epochs"] = epochs
    with tempfile.TemporaryDirectory() as work:
        ctx = _context(app_dir, data_dir, Path(work), "train", run_config, lambda p, _metrics, _step: progress.append(p))
        result = trainer.train(convert_weights(trainer.initial_weights(), tensor_format), ctx)
    return BaselineRun(convert_weights(result.weights, tensor_format), epochs, result.num_samples, progress)

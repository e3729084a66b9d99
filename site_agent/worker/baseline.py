"""Running an app's trainer in this process, without a federation.

For comparisons: how a model does on a given data folder (``evaluate_weights``), and
what a site would reach on its own data alone (``train_local_only``), with the same
trainer, settings and number of rounds as the federation. The demo and the tests use
it; agents never do.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flare_provider.wire.bundles import load_app_config

from ..trainer import EvalResult, TaskContext
from .task_runner import load_trainer_class
from .weights import convert_weights


def _trainer(app_dir: Path):
    config = load_app_config(app_dir)
    cls = load_trainer_class(config.trainer_path, app_dir, allow_custom_code=True)
    return cls(**config.trainer_args), getattr(cls, "tensor_format", "numpy")


def _context(app_dir: Path, data_dir: Path, work_dir: Path, kind: str, round_number: int, config: dict) -> TaskContext:
    return TaskContext(
        task_id=f"local-{kind}-{round_number}", site="local", round=round_number, kind=kind, config=config,
        data_dir=Path(data_dir), work_dir=work_dir, app_dir=Path(app_dir), device="cpu",
    )


def evaluate_weights(app_dir: str | Path, weights: Mapping[str, Any], data_dir: str | Path) -> dict[str, float]:
    """The trainer's ``evaluate`` metrics of ``weights`` on ``data_dir``'s test data."""
    trainer, tensor_format = _trainer(Path(app_dir))
    with tempfile.TemporaryDirectory() as work:
        result: EvalResult = trainer.evaluate(
            convert_weights(weights, tensor_format), _context(app_dir, data_dir, Path(work), "evaluate", 0, {})
        )
    return dict(result.metrics)


def train_local_only(
    app_dir: str | Path, data_dir: str | Path, rounds: int, config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Weights after ``rounds`` rounds of training on ``data_dir`` alone, from the app's initial model."""
    trainer, tensor_format = _trainer(Path(app_dir))
    weights = convert_weights(trainer.initial_weights(), tensor_format)
    with tempfile.TemporaryDirectory() as work:
        for number in range(1, rounds + 1):
            ctx = _context(app_dir, data_dir, Path(work), "train", number, {**(config or {}), "round": number})
            weights = convert_weights(trainer.train(weights, ctx).weights, tensor_format)
    return weights

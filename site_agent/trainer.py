"""The trainer API: what an app's trainer implements, and what it is given.

A trainer is a class named in the app's ``app.yaml`` (``trainer.path``), built with the
``trainer.args`` found there. For each task the agent starts a fresh process, builds the
trainer and calls one method:

``train(weights, ctx) -> TrainResult``
    ``weights`` are the global model (name -> numpy array, or torch tensor when the
    class sets ``tensor_format = "torch"``). Return new weights (the same names,
    shapes and dtypes) or their difference to the global ones, the number of samples
    trained on, and metrics.
``evaluate(weights, ctx) -> EvalResult``  (optional)
    Validation metrics of the given (global) weights on this site's data.
``describe(ctx) -> DataSummary``  (optional)
    The size and schema of this site's data, without training: the server may compare
    every site's before a run trains (``check_data``). Keep it cheap, and let the schema
    hold what must agree across sites (feature shapes, column names and types), not
    what may differ (label counts).

``ctx`` (:class:`TaskContext`) says which round this is, the round's config, where
the site's data is, which device to use and where to write scratch files; its
``report(progress, step=None, **metrics)`` streams progress and a point of the training
curve (thinned at the site, see ``docs/tracking.md``) to the agent and on to Airflow.

Everything the trainer returns is checked before it leaves the site: a NaN or
infinite value, a missing or extra tensor, or a changed shape fails the task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["DataSummary", "EvalResult", "TaskContext", "TrainResult", "Trainer", "Weights"]

Weights = Mapping[str, Any]
"""Model weights by name: numpy arrays or torch tensors."""


@dataclass
class TaskContext:
    """What a trainer knows about the task it runs."""

    task_id: str
    site: str
    round: int
    kind: str  # "train", "evaluate", "initialize" or "describe"
    config: dict[str, Any]  # this round's settings from the server (lr, epochs, fedprox_mu...)
    data_dir: Path  # the site's data folder (site.yaml: data_dir)
    work_dir: Path  # scratch folder of this task; the agent removes it once the server has the result
    app_dir: Path  # the app's files (app.yaml, custom/)
    device: str  # "cuda:0" when GPUs are assigned and CUDA works, else "cpu"
    gpus: tuple[int, ...] = ()  # physical GPU ids assigned; visible to the process as cuda:0..n-1
    # this site's folder for the run (and app): kept across rounds and agent restarts; None
    # when the server names no run. Created by whoever writes to it first.
    state_dir: Path | None = None
    # PyTorch distributed: this process's rank among the task's ranks (one per GPU, or per
    # process on CPU, as the task asked); rank 0 is the one whose result leaves the site.
    rank: int = 0
    world_size: int = 1
    # (progress, metrics, step) -> None: where reports go (the agent's pipe in a task)
    _reporter: Callable[[float, dict[str, float], int], None] | None = field(default=None, repr=False)
    _last_step: int | None = field(default=None, repr=False)

    def report(self, progress: float, step: int | None = None, **metrics: float) -> None:
        """Tell the agent how far the task is (0..1) and its latest metrics (numbers).

        ``step`` places the metrics on the task's training curve (a batch or epoch
        number, whole and >= 0); by default a report is one step after the one before
        (the first is step 0).
        """
        values = {name: as_number(value, f"metric {name!r}") for name, value in metrics.items()}
        progress = min(1.0, max(0.0, as_number(progress, "progress")))
        if step is None:
            step = 0 if self._last_step is None else self._last_step + 1
        elif isinstance(step, bool) or not hasattr(step, "__index__") or step.__index__() < 0:
            raise TypeError(f"step must be a whole number >= 0, got {step!r}")
        self._last_step = step = step.__index__()
        if self._reporter is not None:
            self._reporter(progress, values, step)


@dataclass
class TrainResult:
    """What ``train`` returns."""

    weights: Weights
    num_samples: int  # samples trained on: the weight of this site in FedAvg
    metrics: dict[str, float] = field(default_factory=dict)
    is_difference: bool = False  # True when ``weights`` hold (local - global)


@dataclass
class DataSummary:
    """What ``describe`` returns: the size and shape of a site's data, without training.

    ``schema`` is JSON-like (e.g. ``{"features": [...], "labels": [...]}``); the server can
    require every site's to agree before a run trains."""

    num_samples: int
    schema: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    """What ``evaluate`` returns."""

    metrics: dict[str, float]
    num_samples: int = 0


def as_number(value: Any, what: str) -> float:
    """``value`` as a float; numpy and torch scalars are accepted, text and flags are not."""
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}") from None


class Trainer:
    """Base class of trainers (optional: any class with these methods works).

    The constructor receives ``trainer.args`` from ``app.yaml`` as keyword arguments.
    """

    tensor_format: ClassVar[str] = "numpy"  # how global weights are handed in: "numpy" or "torch"

    def train(self, weights: Weights, ctx: TaskContext) -> TrainResult:
        raise NotImplementedError(f"{type(self).__name__} does not implement train()")

    def evaluate(self, weights: Weights, ctx: TaskContext) -> EvalResult:
        raise NotImplementedError(f"{type(self).__name__} does not implement evaluate()")

    def describe(self, ctx: TaskContext) -> DataSummary:
        raise NotImplementedError(f"{type(self).__name__} does not implement describe(): the app cannot take part in a data check")

    # Optional: ``initial_weights(self) -> Weights``, the app's starting model, used for
    # tasks of kind "initialize" when a run is given no initial model.

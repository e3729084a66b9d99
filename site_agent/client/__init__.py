"""The client API of script apps: a training script made federated with a few calls.

An app whose ``app.yaml`` names ``script: custom/train.py`` has no trainer class: for each
task the site's worker runs the script (its own ``__main__``) and the script talks to
the task through this module::

    import site_agent.client as flare

    flare.init(tensor_format="torch")
    model = flare.receive()                  # the global model: .params, .round, .config, .kind
    if model.params:
        net.load_state_dict(model.params)
    ...                                      # ordinary training on flare.data_dir(), flare.device()
    flare.report(0.5, loss=0.31)             # progress and metrics, streamed to Airflow
    flare.send(params=net.state_dict(), num_samples=n, metrics={"accuracy": 0.93})

A task is answered once: ``send`` (train, initialize), ``send_metrics`` (evaluate) or
``send_summary`` (describe); a script that ends without answering fails its task. On
ranks other than 0 of a multi-process task the ``send`` calls send nothing (the worker
checks what they were given and discards it, as it does a trainer's result there), and
may be left out: rank 0's answer is the site's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._task import TASK_KINDS, ClientAPIError, Model, check_format, current

__all__ = [
    "ClientAPIError", "Model", "TASK_KINDS", "data_dir", "device", "init", "is_describe", "is_evaluate",
    "is_initialize", "is_running", "is_train", "log", "rank", "receive", "report", "send", "send_metrics",
    "send_summary", "site_name", "state_dir", "system_info", "task_kind", "work_dir", "world_size",
]


def init(tensor_format: str = "numpy") -> None:
    """Start using the API; ``tensor_format`` ("numpy" or "torch") is how ``receive`` hands out params.

    Optional (the other calls work without it); calling it again changes the format."""
    current().tensor_format = check_format(tensor_format, "init()")


def receive(tensor_format: str | None = None) -> Model | None:
    """The model this task starts from (the same object on every call), or None once the task is answered."""
    return current().receive(tensor_format)


def send(params: Any = None, num_samples: int | None = None, metrics: Any = None, is_difference: bool = False) -> None:
    """Answer a train task (``params``, ``num_samples``, optional ``metrics``; ``is_difference``
    when params hold local minus global), an initialize task (``params``), or an evaluate
    task (``metrics`` only)."""
    current().send(params, num_samples, metrics, is_difference)


def send_metrics(metrics: Any = None, num_samples: int = 0, **more: Any) -> None:
    """Answer an evaluate task: the metrics of the received model on this site's data."""
    merged = metrics
    if more:  # keyword metrics join a dict given too; anything else given fails the check below
        merged = {**more} if metrics is None else {**metrics, **more} if isinstance(metrics, dict) else metrics
    current().send_metrics(merged, num_samples)


def send_summary(num_samples: int, schema: dict[str, Any] | None = None) -> None:
    """Answer a describe task: how many samples the site has and their schema (JSON-like)."""
    current().send_summary(num_samples, schema)


def report(progress: float, **metrics: Any) -> None:
    """Stream progress (0..1) and numeric metrics to the agent and on to Airflow."""
    current().report(progress, metrics)


def log(**metrics: Any) -> None:
    """Stream metrics, keeping the last reported progress."""
    current().report(None, metrics)


def is_running() -> bool:
    """True until the task is answered: ``while flare.is_running():`` loops end after the send."""
    return not current().answered


def task_kind() -> str:
    """The task's kind: ``train``, ``evaluate``, ``describe`` or ``initialize``."""
    return current().ctx.kind


def is_train() -> bool:
    return task_kind() == "train"


def is_evaluate() -> bool:
    return task_kind() == "evaluate"


def is_describe() -> bool:
    return task_kind() == "describe"


def is_initialize() -> bool:
    return task_kind() == "initialize"


def site_name() -> str:
    return current().ctx.site


def device() -> str:
    """``cuda:0`` when the task has a GPU and CUDA works, else ``cpu``."""
    return current().ctx.device


def data_dir() -> Path:
    """The site's data folder (``data_dir`` in its ``local/site.yaml``)."""
    return current().ctx.data_dir


def work_dir() -> Path:
    """The task's scratch folder (also the script's working directory); removed after the task."""
    return current().ctx.work_dir


def state_dir() -> Path | None:
    """The site's folder for this run and app, kept across rounds and agent restarts (None
    when the server names no run); created by whoever writes to it first."""
    return current().ctx.state_dir


def rank() -> int:
    return current().ctx.rank


def world_size() -> int:
    return current().ctx.world_size


def system_info() -> dict[str, Any]:
    """Who and where: site, task id, kind, round, rank, world size, device and folders."""
    ctx = current().ctx
    return {"site": ctx.site, "task_id": ctx.task_id, "kind": ctx.kind, "round": ctx.round, "rank": ctx.rank,
            "world_size": ctx.world_size, "device": ctx.device, "data_dir": str(ctx.data_dir),
            "work_dir": str(ctx.work_dir)}

"""The task a script answers: what it was given, and what it sent back.

The worker opens one :class:`ScriptTask` around a run of the script
(:mod:`site_agent.worker.script_app`); the functions of :mod:`site_agent.client` act on
the open one. Everything the script sends is checked here, at the call, so that a wrong
type fails with a message naming the call and the argument, not later in the worker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..trainer import TaskContext, as_number

TENSOR_FORMATS = ("numpy", "torch")
TASK_KINDS = ("train", "evaluate", "describe", "initialize")


class ClientAPIError(RuntimeError):
    """The script used the client API in a way the task cannot accept; the message says how."""


@dataclass
class Model:
    """What :func:`site_agent.client.receive` returns: the model the task starts from.

    ``params`` is empty where there is no global model yet (a run's first round without an
    initial model, an ``initialize`` or a ``describe`` task): the script starts from its own
    initialisation then.
    """

    params: dict[str, Any]  # name -> numpy array or torch tensor (CPU), as asked for
    round: int  # this round's number
    config: dict[str, Any]  # this round's settings from the server (lr, epochs, num_rounds...)
    kind: str  # "train", "evaluate", "describe" or "initialize"

    @property
    def num_rounds(self) -> int | None:
        """The run's number of rounds, where the server says (round config ``num_rounds``)."""
        value = self.config.get("num_rounds")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class Answer:
    """What the script sent: one answer per task, of the task's kind."""

    params: dict[str, Any] | None = None
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    is_difference: bool = False
    schema: dict[str, Any] | None = None  # a describe task's answer


@dataclass
class ScriptTask:
    """One task, as the script sees it."""

    ctx: TaskContext
    weights: Mapping[str, Any]  # the global model as the worker loaded it (numpy)
    tensor_format: str = "numpy"
    answer: Answer | None = None  # set by the first send
    _received: dict[str, Model] = field(default_factory=dict)
    _progress: float = 0.0

    # ---- what the script is given -----------------------------------------------

    @property
    def answered(self) -> bool:
        return self.answer is not None

    def receive(self, tensor_format: str | None) -> Model | None:
        if self.answered:  # the task is answered: there is no next model in this process
            return None
        fmt = check_format(tensor_format or self.tensor_format, "receive()")
        if fmt not in self._received:
            from ..worker.weights import convert_weights

            params = convert_weights(self.weights, fmt) if self.weights else {}
            ctx = self.ctx
            self._received[fmt] = Model(params=params, round=ctx.round, config=dict(ctx.config), kind=ctx.kind)
        return self._received[fmt]

    def report(self, progress: float | None, metrics: Mapping[str, Any]) -> None:
        if progress is not None:
            self._progress = min(1.0, max(0.0, _number(progress, "report(): progress")))
        values = {name: _number(value, f"report(): metric {name!r}") for name, value in metrics.items()}
        self.ctx.report(self._progress, **values)

    # ---- what the script sends ----------------------------------------------------

    def send(self, params: Any, num_samples: Any, metrics: Any, is_difference: Any) -> None:
        kind = self.ctx.kind
        what = self._unanswered("send()")
        if kind == "describe":
            raise ClientAPIError(f"{what}: this is a describe task; answer it with send_summary(num_samples, schema)")
        if not isinstance(is_difference, bool):
            raise ClientAPIError(f"{what}: is_difference must be True or False, got {type(is_difference).__name__}")
        if kind == "evaluate":
            if params is not None:
                raise ClientAPIError(f"{what}: an evaluate task returns metrics only, but params were given "
                                     "(use send_metrics(metrics) or send(metrics=...))")
            answer = Answer(num_samples=_count(num_samples or 0, what), metrics=_metrics(metrics, what))
        else:
            if params is None:
                raise ClientAPIError(f"{what}: a {kind} task must send params (the model's tensors by name)")
            if kind == "train" and num_samples is None:
                raise ClientAPIError(f"{what}: num_samples is required for a train task (it weighs the site in the average)")
            if kind == "initialize" and is_difference:
                raise ClientAPIError(f"{what}: an initialize task sends full weights, not a difference")
            answer = Answer(params=_params(params, what), num_samples=_count(num_samples or 0, what),
                            metrics=_metrics(metrics, what), is_difference=is_difference)
        self._answer(answer, what)

    def send_metrics(self, metrics: Any, num_samples: Any) -> None:
        what = self._unanswered("send_metrics()")
        if self.ctx.kind != "evaluate":
            raise ClientAPIError(f"{what}: this is a {self.ctx.kind} task; send_metrics answers evaluate tasks "
                                 f"({_answer_hint(self.ctx.kind)})")
        self._answer(Answer(num_samples=_count(num_samples, what), metrics=_metrics(metrics, what)), what)

    def send_summary(self, num_samples: Any, schema: Any) -> None:
        what = self._unanswered("send_summary()")
        if self.ctx.kind != "describe":
            raise ClientAPIError(f"{what}: this is a {self.ctx.kind} task; send_summary answers describe tasks "
                                 f"({_answer_hint(self.ctx.kind)})")
        schema = {} if schema is None else schema
        if not isinstance(schema, dict):
            raise ClientAPIError(f"{what}: schema must be a dict (JSON-like), got {type(schema).__name__}")
        try:
            schema = json.loads(json.dumps(schema, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ClientAPIError(f"{what}: schema must be JSON-like (dicts, lists, text, finite numbers): {exc}") from None
        self._answer(Answer(num_samples=_count(num_samples, what), schema=schema), what)

    def _unanswered(self, what: str) -> str:
        if self.answered:
            raise ClientAPIError(f"{what}: the task was already answered; a script sends once per task")
        return what

    def _answer(self, answer: Answer, what: str) -> None:
        self._unanswered(what)
        # On every rank: the worker checks each rank's answer as it checks a trainer's
        # result, and only rank 0's leaves the site (the others' are discarded there).
        self.answer = answer


def check_format(tensor_format: Any, what: str) -> str:
    if tensor_format not in TENSOR_FORMATS:
        raise ClientAPIError(f"{what}: tensor_format must be one of {TENSOR_FORMATS}, got {tensor_format!r}")
    return tensor_format


def _answer_hint(kind: str) -> str:
    return {
        "train": "answer it with send(params=..., num_samples=...)",
        "initialize": "answer it with send(params=...)",
        "evaluate": "answer it with send_metrics(metrics)",
        "describe": "answer it with send_summary(num_samples, schema)",
    }.get(kind, f"kind {kind!r}")


def _number(value: Any, what: str) -> float:
    try:
        return as_number(value, what)
    except TypeError as exc:
        raise ClientAPIError(str(exc)) from None


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ClientAPIError(f"{what}: num_samples must be a whole number, got {value!r}")
    if int(value) < 0:
        raise ClientAPIError(f"{what}: num_samples must not be negative, got {int(value)}")
    return int(value)


def _metrics(metrics: Any, what: str) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ClientAPIError(f"{what}: metrics must be a dict of name -> number, got {type(metrics).__name__}")
    return {str(name): _number(value, f"{what}: metric {name!r}") for name, value in metrics.items()}


def _params(params: Any, what: str) -> dict[str, Any]:
    """The tensors, copied (a script may go on changing its model after sending it)."""
    if not isinstance(params, Mapping):
        hint = " (send model.state_dict(), not the model)" if hasattr(params, "state_dict") else ""
        raise ClientAPIError(f"{what}: params must be a dict of name -> tensor, got {type(params).__name__}{hint}")
    if not params:
        raise ClientAPIError(f"{what}: params is empty")
    copied = {}
    for name, value in params.items():
        if not isinstance(name, str):
            raise ClientAPIError(f"{what}: tensor names must be text, got {name!r}")
        module = type(value).__module__
        if module.startswith("torch") and hasattr(value, "detach"):
            copied[name] = value.detach().to("cpu", copy=True)
        elif module == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape"):
            import numpy as np

            copied[name] = np.array(value, copy=True)
        else:
            raise ClientAPIError(f"{what}: params[{name!r}] is a {type(value).__name__}, expected a numpy array or torch tensor")
    return copied


# ---- the open task ------------------------------------------------------------------

_current: ScriptTask | None = None


@contextmanager
def open_task(task: ScriptTask) -> Iterator[ScriptTask]:
    """Make ``task`` the one the client API acts on while the script runs."""
    global _current
    if _current is not None:
        raise RuntimeError("a script task is already open in this process")
    _current = task
    try:
        yield task
    finally:
        _current = None


def current() -> ScriptTask:
    if _current is None:
        raise ClientAPIError(
            "site_agent.client works inside a task only: the site agent runs this script for an app "
            "whose app.yaml names it (script: custom/...)"
        )
    return _current

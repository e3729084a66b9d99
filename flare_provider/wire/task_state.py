"""A task's state at a site: the one record the agent keeps and the Airflow side reads.

The agent persists it (``asdict``) and sends it as the ``TaskState`` message; clients,
the run engine and the trigger read it back with :meth:`TaskState.from_message` or
:meth:`TaskState.from_dict` (trigger events and XCom travel as JSON).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from . import agent_pb2

QUEUED, RUNNING, SUCCEEDED, FAILED, ABORTED = "queued", "running", "succeeded", "failed", "aborted"
TERMINAL_STATUSES = frozenset({SUCCEEDED, FAILED, ABORTED})
# train: update the model; evaluate: score it; initialize: the app builds a starting model;
# describe: the trainer summarizes the site's data (size, schema) without training.
TASK_KINDS = ("train", "evaluate", "initialize", "describe")
# In a train result's safetensors metadata: "true" where the site lets the server keep this
# local model and send it to the other sites for cross-site evaluation (site.yaml
# share_local_model); anything else, or no entry, means it may not.
SHARE_LOCAL_MODEL_KEY = "flare.share_local_model"

# Fields the message carries as `optional`: absent there, None here.
_OPTIONAL = ("error", "started_at", "finished_at")


@dataclass
class MetricPoint:
    """One report of a trainer as it left the site: its step, when, and the allowed metrics."""

    step: int
    time: float  # seconds since the epoch
    values: dict[str, float]

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "MetricPoint":
        return cls(step=int(doc["step"]), time=float(doc["time"]), values={str(k): float(v) for k, v in doc["values"].items()})


@dataclass
class TaskState:
    """Where a task stands; ``seq`` grows on every change."""

    task_id: str
    app_name: str
    app_version: str
    round: int
    kind: str
    status: str  # queued, running, succeeded, failed, aborted
    progress: float
    metrics: dict[str, float]
    error: str | None
    gpus: list[int]
    num_samples: int
    result_available: bool  # a result on disk at the site, not yet acknowledged
    seq: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    summary_json: str = ""  # a describe task's DataSummary as JSON
    # the trainer's reports by step, thinned at the site (site_agent.runtime.metric_series)
    history: list[MetricPoint] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for the agent's task folder, trigger events and XCom."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "TaskState":
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in doc.items() if k in known})
        state.history = [p if isinstance(p, MetricPoint) else MetricPoint.from_dict(p) for p in state.history or []]
        return state

    def to_message(self) -> agent_pb2.TaskState:
        message = agent_pb2.TaskState(
            **{f.name: getattr(self, f.name) for f in fields(self) if f.name not in (*_OPTIONAL, "history")}
        )
        message.history.extend(agent_pb2.MetricPoint(step=p.step, time=p.time, values=p.values) for p in self.history)
        for name in _OPTIONAL:
            if getattr(self, name) is not None:
                setattr(message, name, getattr(self, name))
        return message

    @classmethod
    def from_message(cls, m: agent_pb2.TaskState) -> "TaskState":
        return cls(
            task_id=m.task_id,
            app_name=m.app_name,
            app_version=m.app_version,
            round=m.round,
            kind=m.kind,
            status=m.status,
            progress=m.progress,
            metrics=dict(m.metrics),
            error=m.error if m.HasField("error") else None,
            gpus=list(m.gpus),
            num_samples=m.num_samples,
            result_available=m.result_available,
            seq=m.seq,
            created_at=m.created_at,
            started_at=m.started_at if m.HasField("started_at") else None,
            finished_at=m.finished_at if m.HasField("finished_at") else None,
            summary_json=m.summary_json,
            history=[MetricPoint(p.step, p.time, dict(p.values)) for p in m.history],
        )

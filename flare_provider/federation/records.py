"""The named records of a federated run: what it does, where it stands, what each round did.

No numpy and no Airflow here: the operator, the trigger, the Federation page and the
demo read these records without the engine's dependencies. Everything that travels
(a deferral's state, a committed round's history) goes through ``to_dict``/``from_dict``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..files import safe_name
from .errors import RoundFailed

# Settings of how the run waits, not of what it trains: they stay out of the config hash.
_OPERATIONAL = ("run_id", "connect_grace", "status_poll_interval")


def run_key(federation: str, run_id: str) -> str:
    """A run's name at the sites: every task id of the run starts with it (see ``RunSpec.task_id``)."""
    return hashlib.sha256(f"{federation}\0{run_id}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunSpec:
    """What a federated run does.

    :param connect_grace: seconds a site may be unreachable when a task is sent to it (an
        agent restarting, a network blip) before it is dropped from that round.
    :param status_poll_interval: seconds between two status polls of the sites by the
        deferrable trigger (the worker follows the sites' streams and does not poll).
    """

    federation: str
    run_id: str
    app_name: str
    sites: tuple[str, ...]
    num_rounds: int
    min_clients: int
    wait_time_after_min_received: float = 10.0
    train_timeout: float = 3600.0
    aggregator: str = "fedavg"
    aggregator_args: Mapping[str, Any] = field(default_factory=dict)
    train_config: Mapping[str, Any] = field(default_factory=dict)
    round_configs: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    app_version: str | None = None
    num_gpus: int | None = None
    # ranks of a site task that runs on CPU (None: 1); a task on GPUs runs one rank per GPU
    num_processes: int | None = None
    snapshot_every: int = 1
    connect_grace: float = 10.0
    status_poll_interval: float = 2.0
    # central differential privacy of the aggregate (docs/privacy.md); empty: none
    central_dp: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.central_dp:
            from ..privacy.central import CentralDPSettings

            try:
                CentralDPSettings.from_dict(self.central_dp)
            except ValueError as exc:
                problems.append(str(exc))
        if self.num_rounds < 1:
            problems.append(f"num_rounds must be at least 1, got {self.num_rounds}")
        if not self.sites:
            problems.append("no sites to train at")
        if len(set(self.sites)) != len(self.sites):
            problems.append(f"a site is named twice in {list(self.sites)}")
        if not 1 <= self.min_clients <= len(self.sites):
            problems.append(f"min_clients must be between 1 and the number of sites ({len(self.sites)}), got {self.min_clients}")
        if self.wait_time_after_min_received < 0 or self.train_timeout <= 0:
            problems.append("wait_time_after_min_received must be >= 0 and train_timeout > 0")
        if self.num_processes is not None and (
            isinstance(self.num_processes, bool) or not isinstance(self.num_processes, int) or self.num_processes < 1
        ):
            problems.append(f"num_processes must be a whole number >= 1 or None, got {self.num_processes!r}")
        if self.snapshot_every < 1:
            problems.append(f"snapshot_every must be at least 1, got {self.snapshot_every}")
        if self.connect_grace < 0 or self.status_poll_interval <= 0:
            problems.append("connect_grace must be >= 0 and status_poll_interval > 0")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def config_hash(self) -> str:
        doc = {k: v for k, v in asdict(self).items() if k not in _OPERATIONAL}
        doc["round_configs"] = {str(k): v for k, v in self.round_configs.items()}
        if not self.central_dp:  # runs without it keep the hash they had before it existed
            doc.pop("central_dp")
        if self.num_processes is None:  # likewise
            doc.pop("num_processes")
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def run_key(self) -> str:
        return run_key(self.federation, self.run_id)

    def task_id(self, round_number: int, site: str, kind: str = "train") -> str:
        """The same (run, round, site) always gives the same id: a resubmit re-attaches."""
        suffix = "" if kind == "train" else f"-{kind}"
        return f"{self.run_key}-r{round_number:04d}-{safe_name(site)}{suffix}"

    def trainer_config(self, round_number: int, extra: Mapping[str, Any]) -> dict[str, Any]:
        config = {**self.train_config, **self.round_configs.get(round_number, {}), **extra}
        config.update(round=round_number, num_rounds=self.num_rounds)
        return config


@dataclass
class InFlight:
    """Tasks sent to sites and not yet gathered: which site got which task, and who dropped out.

    ``round`` numbers the step of the workflow (a round of scatter-gather).
    """

    round: int
    task_ids: dict[str, str]
    started_at: float
    deadline: float
    dropped: dict[str, str] = field(default_factory=dict)
    reattached: list[str] = field(default_factory=list)

    @property
    def active_tasks(self) -> dict[str, str]:
        """site -> task id of the sites still in the round."""
        return {s: t for s, t in self.task_ids.items() if s not in self.dropped}

    def drop(self, site: str, why: str) -> None:
        """Out of this round; the first reason given is kept."""
        self.dropped.setdefault(site, why)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "InFlight":
        return cls(
            round=int(doc["round"]),
            task_ids=dict(doc["task_ids"]),
            started_at=float(doc["started_at"]),
            deadline=float(doc["deadline"]),
            dropped=dict(doc.get("dropped") or {}),
            reattached=list(doc.get("reattached") or []),
        )

    @classmethod
    def from_watched(cls, event: Mapping[str, Any]) -> "InFlight":
        """A round as a round trigger's event shows it: its task ids and each site's last state."""
        states = [doc for doc in (event.get("tasks") or {}).values() if isinstance(doc, Mapping)]
        if not states:
            raise RoundFailed(f"the round's trigger reached no site: {event.get('errors') or event.get('reason')}")
        now = time.time()
        return cls(
            round=max(int(doc["round"]) for doc in states),
            task_ids=dict(event.get("task_ids") or {}),
            started_at=min(float(doc.get("created_at") or now) for doc in states),
            deadline=now,
        )


@dataclass
class Progress:
    """Where a run stands: the last committed round and the global model after it.

    ``weights`` maps tensor names to arrays: in memory after a restore, or a
    :class:`~flare_provider.wire.tensors.TensorFile` reading the engine's copy on disk
    while the sites train.
    """

    round: int
    weights: Mapping[str, Any]
    history: list["RoundRecord"]
    snapshot_uri: str | None = None

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.history[-1].metrics) if self.history else {}


@dataclass
class SiteRound:
    """One site's part in a round, as the round record keeps it."""

    status: str  # the task's final status, or "dropped"
    task_id: str | None = None
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    reattached: bool = False
    # the privacy filters the site applied to its update, as its result file records them
    privacy: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, doc: Any) -> "SiteRound":
        doc = doc if isinstance(doc, Mapping) else {}
        samples = doc.get("num_samples")
        return cls(
            status=str(doc.get("status") or "dropped"),
            task_id=doc.get("task_id") if isinstance(doc.get("task_id"), str) else None,
            num_samples=samples if isinstance(samples, int) and not isinstance(samples, bool) else 0,
            metrics=numbers(doc.get("metrics")),
            error=str(doc["error"]) if doc.get("error") else None,
            reattached=bool(doc.get("reattached")),
            privacy=dict(doc["privacy"]) if isinstance(doc.get("privacy"), Mapping) else {},
        )


@dataclass
class RoundRecord:
    """What one committed round did; the run's history is a list of these.

    :meth:`from_dict` reads whatever a snapshot holds without raising: a damaged or
    older record shows what it can (missing numbers are None, odd values dropped).
    """

    round: int | None
    started_at: float | None
    duration_s: float | None
    accepted: list[str]
    dropped: dict[str, str]
    num_samples: int | None
    sites: dict[str, SiteRound]
    metrics: dict[str, float]
    # The sites' evaluation of the round's global model (sample-weighted), where the run
    # keeps its best round; ``metrics`` are what the sites reported from training.
    evaluation: dict[str, float] = field(default_factory=dict)
    # central differential privacy of the round (clip, noise, epsilon spent so far); empty: none
    privacy: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Any) -> "RoundRecord":
        doc = doc if isinstance(doc, Mapping) else {}
        sites = doc.get("sites") if isinstance(doc.get("sites"), Mapping) else {}
        dropped = doc.get("dropped") if isinstance(doc.get("dropped"), Mapping) else {}
        accepted = doc.get("accepted") if isinstance(doc.get("accepted"), list) else []
        return cls(
            round=_integer(doc.get("round")),
            started_at=_finite(doc.get("started_at")),
            duration_s=_finite(doc.get("duration_s")),
            accepted=[s for s in accepted if isinstance(s, str)],
            dropped={str(s): str(why) for s, why in dropped.items()},
            num_samples=_integer(doc.get("num_samples")),
            sites={str(s): SiteRound.from_dict(info) for s, info in sites.items()},
            metrics=numbers(doc.get("metrics")),
            evaluation=numbers(doc.get("evaluation")),
            privacy=dict(doc["privacy"]) if isinstance(doc.get("privacy"), Mapping) else {},
        )

    def site_names(self) -> set[str]:
        return {*self.sites, *self.accepted, *self.dropped}


def read_history(history: Any) -> list[RoundRecord]:
    """A snapshot state's ``history`` as records (anything that is not a list reads as empty)."""
    return [RoundRecord.from_dict(doc) for doc in history if isinstance(doc, Mapping)] if isinstance(history, list) else []


def weighted_metrics(per_site: Mapping[str, SiteRound | Mapping[str, Any]]) -> dict[str, float]:
    """Sample-weighted mean of each metric over the sites that reported it.

    Summed in site-name order, not arrival order: the same reports give the same bits.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for site in sorted(per_site):
        report = per_site[site]
        report = report if isinstance(report, SiteRound) else SiteRound.from_dict({"status": "", **report})
        for name, value in report.metrics.items():
            sums[name] = sums.get(name, 0.0) + report.num_samples * value
            weights[name] = weights.get(name, 0.0) + report.num_samples
    return {name: sums[name] / weights[name] for name in sorted(sums) if weights[name] > 0}


def numbers(value: Any) -> dict[str, float]:
    """The finite numeric entries of a mapping (metrics), as floats; anything else reads as empty."""
    if not isinstance(value, Mapping):
        return {}
    return {str(k): float(v) for k, v in value.items() if _finite(v) is not None}


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


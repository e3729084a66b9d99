"""The Federation page's "round in progress": the training curves the sites report while they train.

Each running (or queued) training task an agent reports carries its curve so far (the
points its site let through, see ``docs/tracking.md``). Tasks are grouped into rounds by
their id, ``<run key>-r<round>-<site>``, so two federations training at once are two
groups. No Airflow here: :mod:`.app` serves these as JSON (``/flare/curves``) and as the
page's fragment (``/flare/live``), which the page fetches again every few seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .charts import Chart, step_chart
from .dashboard import ConnectionView

LIVE_STATUSES = ("running", "queued")
REFRESH_SECONDS = 5


@dataclass
class LiveRound:
    """One round being trained: each site's status, progress and curve so far."""

    conn_id: str
    project: str
    run_key: str
    round: int
    app: str
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> status, progress, history

    def metric_names(self) -> list[str]:
        return sorted({name for s in self.sites.values() for p in s["history"] for name in p["values"]})

    def curves(self) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """metric -> site -> [(step, value)], in step order."""
        by_metric: dict[str, dict[str, list[tuple[int, float]]]] = {}
        for site, info in sorted(self.sites.items()):
            for point in info["history"]:
                for name, value in point["values"].items():
                    by_metric.setdefault(name, {}).setdefault(site, []).append((int(point["step"]), float(value)))
        return {name: {site: sorted(points) for site, points in sites.items()} for name, sites in sorted(by_metric.items())}

    def charts(self, colors: Mapping[str, str]) -> list[Chart]:
        return [step_chart(name, per_site, colors) for name, per_site in self.curves().items()]

    def to_dict(self) -> dict[str, Any]:
        return {"conn_id": self.conn_id, "project": self.project, "run_key": self.run_key, "round": self.round,
                "app": self.app, "sites": self.sites, "curves": self.curves()}


def rounds_in_progress(connections: Sequence[ConnectionView]) -> list[LiveRound]:
    """The training rounds the reachable sites are working on, oldest round first."""
    rounds: dict[tuple[str, str, int], LiveRound] = {}
    for connection in connections:
        for site in connection.sites:
            for task in site.tasks:
                if task.get("kind") != "train" or task.get("status") not in LIVE_STATUSES:
                    continue
                run_key = str(task["task_id"]).split("-r", 1)[0]
                key = (connection.conn_id, run_key, int(task["round"]))
                live = rounds.setdefault(key, LiveRound(connection.conn_id, connection.project, run_key, key[2], task.get("app", "")))
                live.sites[site.name] = {"status": task["status"], "progress": float(task.get("progress") or 0.0),
                                         "history": list(task.get("history") or [])}
    return [rounds[key] for key in sorted(rounds)]

"""What the Federation page shows, gathered without any web framework.

Sites come live from their agents through each ``flare`` connection's :class:`FlareHook`;
runs come from the snapshot store, each from its newest round that verifies (a round
that does not is skipped and named). Every failure is reported in its place on the page,
as text without secrets; nothing here raises for a site that is down or a store that
cannot be read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

from flare_provider.federation.cross_site_matrix import CrossSiteMatrix, read_matrix
from flare_provider.federation.records import RoundRecord, read_history

REASON_CHARS = 400  # an error shown on the page is cut here (gRPC details can run long)


def reason(exc: BaseException) -> str:
    """An exception as one short line for the page."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def utc(ts: float | str | None) -> str:
    """A timestamp (epoch seconds or ISO 8601) as ``YYYY-MM-DD HH:MM:SS UTC``."""
    if ts in (None, ""):
        return ""
    try:
        when = datetime.fromtimestamp(float(ts), timezone.utc)
    except (TypeError, ValueError):
        try:
            when = datetime.fromisoformat(str(ts)).astimezone(timezone.utc)
        except ValueError:
            return str(ts)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


# ---- sites --------------------------------------------------------------------------


@dataclass
class SiteView:
    name: str
    address: str
    org: str
    reachable: bool
    error: str = ""
    version: str = ""
    gpus: list[int] = field(default_factory=list)
    allow_custom_code: bool = False
    apps: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    up_since: str = ""
    connect: str = "listen"
    attachments: list[dict[str, str]] = field(default_factory=list)  # outbound: relay, since, last ping


@dataclass
class ConnectionView:
    conn_id: str
    project: str = ""
    sites: list[SiteView] = field(default_factory=list)
    error: str = ""
    relay_errors: dict[str, str] = field(default_factory=dict)  # relay -> why it did not answer

    @property
    def reachable(self) -> int:
        return sum(s.reachable for s in self.sites)


def connection_sites(conn_id: str, timeout: float) -> ConnectionView:
    """Every site of connection ``conn_id`` as its agent reports it, asked all at once."""
    from flare_provider.hooks.flare import FlareHook

    hook = FlareHook(conn_id)
    try:
        kit = hook.get_kit()
        statuses = hook.site_status(timeout=timeout)
    except Exception as exc:  # a missing or malformed connection is shown, not raised
        return ConnectionView(conn_id, error=reason(exc))
    view = ConnectionView(conn_id, kit.project)
    attachments: dict[str, list[dict[str, str]]] = {}
    for relay, answer in kit.relay_statuses(timeout).items():
        if isinstance(answer, Exception):
            view.relay_errors[relay] = reason(answer)
            continue
        for entry in answer.get("sites", []):
            attachments.setdefault(entry.get("site"), []).append(
                {"relay": relay, "since": utc(entry.get("since")), "last_ping": utc(entry.get("last_ping"))}
            )
    for name in sorted(statuses):
        endpoint = kit.sites[name]
        status = statuses[name]
        address = endpoint.address if endpoint.connect == "listen" else "dials out to the relays"
        common = {"connect": endpoint.connect, "attachments": attachments.get(name, [])}
        if isinstance(status, Exception):
            view.sites.append(SiteView(name, address, endpoint.org, False, error=reason(status), **common))
            continue
        view.sites.append(
            SiteView(
                name,
                address,
                status.org or endpoint.org,
                True,
                version=status.version,
                gpus=list(status.gpus),
                allow_custom_code=status.allow_custom_code,
                apps=[
                    {"name": a.name, "version": a.version, "custom": a.has_custom_code, "deployed": utc(a.deployed_at)}
                    for a in sorted(status.apps, key=lambda a: (a.name, -a.deployed_at))
                ],
                tasks=[
                    {"task_id": t.task_id, "kind": t.kind, "round": t.round, "status": t.status,
                     "progress": t.progress, "app": t.app_name,
                     # the training curve so far (the Federation page's "round in progress")
                     "history": [{"step": p.step, "time": p.time, "values": dict(p.values)} for p in t.history]}
                    for t in status.active_tasks
                ],
                up_since=utc(status.started_at),
                **common,
            )
        )
    return view


# ---- runs ---------------------------------------------------------------------------


@dataclass
class RunView:
    """A run as its newest verified round describes it."""

    federation: str
    run: str
    committed_rounds: list[int]
    skipped: list[str] = field(default_factory=list)  # rounds that did not verify, with why
    round: int = 0  # the newest round that verified (0: none did)
    uri: str = ""
    committed_at: str = ""
    state: dict[str, Any] = field(default_factory=dict, repr=False)
    store: Any = field(default=None, repr=False, compare=False)  # where the cross-site matrix is read, if asked for

    @cached_property
    def cross_site(self) -> "CrossSiteView | None":
        """The run's cross-site matrix (None: never evaluated), read only for the run the page shows."""
        if self.store is None:
            return None
        try:
            matrix = read_matrix(self.store, self.federation, self.run)
        except Exception as exc:  # shown in its place, not raised
            return CrossSiteView(error=reason(exc))
        return None if matrix is None else CrossSiteView(matrix)

    @cached_property
    def history(self) -> list[RoundRecord]:
        # Read once per view: the page asks for it in every column of every run.
        return read_history(self.state.get("history"))

    @property
    def num_rounds(self) -> int | None:
        value = self.state.get("num_rounds")
        return value if isinstance(value, int) else None

    @property
    def airflow(self) -> dict[str, str]:
        entry = self.state.get("airflow")
        return {k: v for k, v in entry.items() if isinstance(v, str)} if isinstance(entry, Mapping) else {}

    @property
    def dag_id(self) -> str | None:
        return self.airflow.get("dag_id")

    @property
    def metrics(self) -> dict[str, float]:
        return self.last_record.metrics if self.last_record else {}

    @property
    def last_record(self) -> RoundRecord | None:
        history = self.history
        return history[-1] if history else None

    @property
    def finished(self) -> bool:
        return self.num_rounds is not None and self.round >= self.num_rounds

    def sites(self) -> list[str]:
        """Every site named in any round, in name order."""
        return sorted(set().union(*(record.site_names() for record in self.history)))

    def participation(self) -> list[dict[str, Any]]:
        """Per round: when, how long, and what became of each site."""
        rows, sites = [], self.sites()
        for record in self.history:
            cells = {}
            for site in sites:
                info = record.sites.get(site)
                if site in record.accepted:
                    cells[site] = {"state": "accepted", "num_samples": info.num_samples if info else None,
                                   "reattached": bool(info and info.reattached)}
                elif site in record.dropped or info is not None:
                    why = record.dropped.get(site) or (info.error or info.status if info else None) or "dropped"
                    cells[site] = {"state": "dropped", "reason": " ".join(why.split())}
                else:
                    cells[site] = {"state": "absent"}
            rows.append({
                "round": record.round,
                "started": utc(record.started_at),
                "duration_s": record.duration_s,
                "num_samples": record.num_samples,
                "metrics": record.metrics,
                "sites": cells,
            })
        return rows

    def metric_names(self) -> list[str]:
        """The metrics the rounds recorded (each the sites' sample-weighted mean), validation ones first."""
        names = {n for record in self.history for n in record.metrics}
        return sorted(names, key=lambda n: (not n.startswith("val"), n))


def read_run(store, federation: str, run: str) -> RunView:
    """``run`` from its newest round that verifies; the rounds skipped on the way are named."""
    from flare_provider.snapshots import SnapshotCorrupted

    view = RunView(federation, run, store.list_rounds(federation, run), store=store)
    for number in reversed(view.committed_rounds):
        try:
            snapshot = store.get_round(federation, run, number)
        except SnapshotCorrupted as exc:
            view.skipped.append(reason(exc))
            continue
        view.round, view.uri, view.committed_at = snapshot.round, snapshot.uri, snapshot.committed_at
        view.state = dict(snapshot.state) if isinstance(snapshot.state, Mapping) else {}
        break
    return view


def read_runs(store) -> list[RunView]:
    """Every run in the store, the most recently committed first."""
    runs = [read_run(store, federation, run) for federation in store.list_federations() for run in store.list_runs(federation)]
    return sorted(runs, key=lambda r: r.committed_at, reverse=True)


# ---- cross-site evaluation ------------------------------------------------------------

_LOWER_IS_BETTER = ("loss", "error")  # metric names holding these are better when lower


@dataclass
class CrossSiteView:
    """A run's cross-site matrix as the page draws it: one heat-mapped table per metric."""

    matrix: CrossSiteMatrix | None = None
    error: str = ""

    def tables(self) -> list[dict[str, Any]]:
        """Per metric: a row per model, a cell per site and the model's mean over the sites.

        Each value's ``heat`` runs from 0 (the metric's worst value in the matrix) to 1 (its
        best), so the colour says "better" for accuracy and loss alike.
        """
        matrix = self.matrix
        if matrix is None:
            return []
        tables = []
        for metric in matrix.metrics:
            lower_better = any(word in metric.lower() for word in _LOWER_IS_BETTER)
            found = [cell[metric] for row in matrix.values.values() for cell in row.values() if metric in cell]
            low, high = (min(found), max(found)) if found else (0.0, 0.0)

            def heat(value: float | None) -> float | None:
                if value is None:
                    return None
                share = (value - low) / (high - low) if high > low else 1.0
                return 1.0 - share if lower_better else share

            rows = []
            for model in matrix.models:
                name = model["name"]
                cells = [{"site": site, "value": (v := matrix.values.get(name, {}).get(site, {}).get(metric)), "heat": heat(v),
                          "error": matrix.errors.get(name, {}).get(site, "not evaluated")} for site in matrix.sites]
                rows.append({"model": name, "kind": model["kind"], "round": model.get("round"), "cells": cells,
                             "mean": matrix.mean(name, metric)})
            tables.append({"metric": metric, "better": "lower" if lower_better else "higher", "rows": rows})
        return tables

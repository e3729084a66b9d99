"""Reviewing a new global model for a person's approval, and publishing it once approved.

The tasks of ``dags/publish_model.py``: :func:`model_review` turns the model Asset's event
(see :mod:`flare_provider.assets`) into what the approver reads, after checking the model
in the snapshot store is the one the event names; :func:`publish_model` copies it to the
publish location. Runs in Airflow workers; imported by the tasks, not by DAG files.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

PUBLISHED_MODEL = "model.safetensors"
PUBLISHED_RECORD = "model.json"
_EVENT_KEYS = ("federation", "run_id", "round", "digest", "model_uri")


def newest_model_event(events: Iterable[Any]) -> dict[str, Any]:
    """The extra of the newest model event among ``events`` (a run's triggering asset events)."""
    events = sorted(events, key=lambda e: str(getattr(e, "timestamp", "")))
    if not events:
        raise AirflowFailException("no model Asset event triggered this run: it runs when a training run "
                                   "commits a model, not by hand")
    extra = dict(events[-1].extra or {})
    missing = [k for k in _EVENT_KEYS if k not in extra]
    if missing:
        raise AirflowFailException(f"the model event lacks {missing}: it was not emitted by a training operator "
                                   f"of this package (extra: {sorted(extra)})")
    return extra


def _store(uri: str | None, aws_conn_id: str | None):
    from flare_provider.hooks.snapshots import SnapshotStoreHook

    return SnapshotStoreHook(uri, aws_conn_id).get_store()


def _published_key(federation: str, name: str) -> str:
    from flare_provider.snapshots.naming import encode_name

    return f"{encode_name(federation, 'federation')}/{name}"


def _table(rows: dict[str, Any]) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for name, value in sorted(rows.items()):
        if not isinstance(value, dict):
            lines.append(f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |")
    return "\n".join(lines)


def matrix_markdown(matrix: Any) -> str:
    """The cross-site matrix as a table: one row per model, the mean of each metric over the sites."""
    lines = ["| model | " + " | ".join(matrix.metrics) + " |", "|---|" + "---|" * len(matrix.metrics)]
    for name in matrix.model_names:
        cells = [f"{v:.4g}" if (v := matrix.mean(name, metric)) is not None else "-" for metric in matrix.metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_review(events: Iterable[Any], snapshot_uri: str | None, aws_conn_id: str | None,
                 publish_uri: str, federation: str) -> dict[str, Any]:
    """Check the newest event's model against the store; the review the approver reads (``body``)."""
    from flare_provider.federation.cross_site_matrix import read_matrix
    from flare_provider.snapshots import SnapshotError
    from flare_provider.snapshots.layout import MODEL_FILE

    extra = newest_model_event(events)
    if extra["federation"] != federation:
        raise AirflowFailException(f"the event is of federation {extra['federation']!r}, this DAG publishes {federation!r}")
    store = _store(snapshot_uri, aws_conn_id)
    try:
        snapshot = store.get_round(extra["federation"], extra["run_id"], int(extra["round"]))
    except SnapshotError as exc:
        raise AirflowFailException(f"the model the event names is not in the store: {exc}") from None
    stored = snapshot.files[MODEL_FILE]["sha256"]
    if stored != extra["digest"]:
        raise AirflowFailException(f"{snapshot.model_uri} has SHA-256 {stored}, the event says {extra['digest']}")
    matrix = read_matrix(store, extra["federation"], extra["run_id"])
    current = _store(publish_uri, aws_conn_id).backend.get_bytes(_published_key(federation, PUBLISHED_RECORD))
    published = json.loads(current) if current else None

    metrics = dict(extra.get("metrics") or {})
    evaluation = metrics.pop("evaluation", None)
    parts = [f"**Run** `{extra['run_id']}`, round {extra['round']}, SHA-256 `{extra['digest'][:16]}...`",
             f"Model: `{snapshot.model_uri}`", "### Final round", _table(metrics)]
    if evaluation:
        parts += ["### The sites' evaluation of the final model", _table(evaluation)]
    versions = extra.get("data_versions") or {}
    if versions:
        parts += ["### Data versions trained on", "\n".join(f"- {s}: `{v or 'unknown'}`" for s, v in sorted(versions.items()))]
    if matrix is not None:
        parts += ["### Cross-site matrix (mean over sites)", matrix_markdown(matrix)]
    parts += ["### Published now", f"run `{published['run_id']}`, round {published['round']}, metrics "
              f"{published.get('metrics')}" if published else "nothing yet"]
    return {**{k: extra[k] for k in _EVENT_KEYS}, "metrics": extra.get("metrics") or {}, "data_versions": versions,
            "cross_site": matrix.summary("", None) if matrix is not None else None, "published_before": published,
            "body": "\n\n".join(parts)}


def publish_model(review: dict[str, Any], snapshot_uri: str | None, aws_conn_id: str | None,
                  publish_uri: str) -> dict[str, Any]:
    """Copy the reviewed model to ``<publish_uri>/<federation>/model.safetensors`` with its record."""
    from flare_provider.snapshots.layout import json_bytes, now

    store = _store(snapshot_uri, aws_conn_id)
    snapshot = store.get_round(review["federation"], review["run_id"], int(review["round"]))
    target = _store(publish_uri, aws_conn_id).backend
    with tempfile.TemporaryDirectory(prefix="flare-publish-") as tmp:
        path = store.download_weights(snapshot, Path(tmp) / PUBLISHED_MODEL)  # verified on the way
        key = _published_key(review["federation"], PUBLISHED_MODEL)
        target.put_file(key, path, review["digest"])
    record = {k: review[k] for k in ("federation", "run_id", "round", "digest")}
    record.update(metrics=review.get("metrics") or {}, data_versions=review.get("data_versions") or {},
                  source_uri=snapshot.model_uri, uri=target.uri(key), published_at=now())
    target.put_bytes(_published_key(review["federation"], PUBLISHED_RECORD), json_bytes(record))
    return record

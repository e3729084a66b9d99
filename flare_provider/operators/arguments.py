"""Checking operator arguments at DAG parse time, and reading JSON fields once rendered.

One home for what every federated-run operator checks the same way (sites, snapshot URI,
grace and poll intervals, best-model choices), so they refuse the same mistakes with the
same words. Nothing heavy is imported: DAG files parse in milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flare_provider.federation.selection import CHOICES, MODES
from flare_provider.hooks.snapshots import SNAPSHOT_SCHEMES


def is_template(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def rendered_mapping(value: Any, name: str) -> dict[str, Any]:
    """A JSON-object field after rendering: a mapping, or a template that rendered to JSON text."""
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as exc:
            raise ValueError(f"{name} rendered to {value[:200]!r}, which is not a JSON object: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping (a JSON object), got {type(value).__name__}")
    return dict(value)


def selection_problems(op: Any) -> list[str]:
    """What is wrong with an operator's best-model and warm-start arguments (those it has)."""
    problems = []
    best_metric = getattr(op, "best_metric", None)
    early_stop = getattr(op, "early_stop_rounds", None)
    if best_metric is not None and not is_template(best_metric) and (not isinstance(best_metric, str) or not best_metric):
        problems.append(f"best_metric must be a metric name, got {best_metric!r}")
    if getattr(op, "best_mode", "max") not in MODES:
        problems.append(f"best_mode must be one of {', '.join(MODES)}, got {op.best_mode!r}")
    if early_stop is not None and not is_template(early_stop):
        if isinstance(early_stop, bool) or not isinstance(early_stop, int) or early_stop < 1:
            problems.append(f"early_stop_rounds must be a positive integer, got {early_stop!r}")
        elif not best_metric:
            problems.append("early_stop_rounds needs best_metric: rounds are judged by it")
    for name in ("warm_start", "output_model"):
        if getattr(op, name, "last") not in CHOICES:
            problems.append(f"{name} must be one of {', '.join(CHOICES)}, got {getattr(op, name)!r}")
    if getattr(op, "output_model", "last") == "best" and not best_metric:
        problems.append("output_model='best' needs best_metric: without it no round is scored")
    initial = getattr(op, "initial_model", None)
    if getattr(op, "warm_start", "last") == "best" and not is_template(initial) and initial != "previous":
        problems.append(f"warm_start='best' applies to initial_model='previous' only, got initial_model={initial!r}")
    return problems


def run_problems(op: Any) -> list[str]:
    """What is wrong with the arguments a federated-run operator shares (those it has)."""
    problems = []
    sites = getattr(op, "sites", None)
    if isinstance(sites, list) and (not sites or len(set(sites)) != len(sites)):
        problems.append(f"sites must be distinct site names, got {sites!r}")
    uri = getattr(op, "snapshot_uri", None)
    if uri and not is_template(uri) and not (isinstance(uri, str) and uri.startswith(SNAPSHOT_SCHEMES)):
        problems.append(f"snapshot_uri must be s3://bucket/prefix or file:///path, got {uri!r}")
    for name, lowest, strict in (("connect_grace", 0, False), ("poll_interval", 0, True)):
        if not hasattr(op, name):
            continue
        value = getattr(op, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (value <= lowest if strict else value < lowest):
            problems.append(f"{name} must be a number of seconds {'>' if strict else '>='} {lowest}, got {value!r}")
    return problems

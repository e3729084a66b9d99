"""A round's training curves: each site's reported metrics by step, as its task state carried them.

Sites report steps that start again every round (a trainer counts its own batches or
epochs), so each site's curve is placed on a run-wide step axis: a round's steps are
shifted by the site's *step base*, the step after the last one that site used in the
rounds before. The bases go on from round to round in the curves file of every round, so
a resumed run (another worker, the next deferral) carries on where the last one ended.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..snapshots.naming import parse_round_folder, round_folder
from ..wire.task_state import MetricPoint, TaskState
from .run_files import RunFiles

log = logging.getLogger(__name__)

CURVES_DIR = "curves"


@dataclass
class SiteCurve:
    """One site's curve in one round: points on the run-wide axis, and the result's metrics."""

    step_base: int
    points: list[dict[str, Any]] = field(default_factory=list)  # {"step", "time", "values"}; step is run-wide
    metrics: dict[str, float] = field(default_factory=dict)  # the site's round result (e.g. val_accuracy)
    status: str = ""

    @property
    def last_step(self) -> int:
        return max((p["step"] for p in self.points), default=self.step_base)


@dataclass
class RoundCurves:
    """Every site's curve of one round, and where each site's steps go on in the next round."""

    round: int
    sites: dict[str, SiteCurve] = field(default_factory=dict)
    next_step_base: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "RoundCurves":
        doc = json.loads(raw)
        sites = {name: SiteCurve(**curve) for name, curve in doc.get("sites", {}).items()}
        return cls(int(doc["round"]), sites, {k: int(v) for k, v in doc.get("next_step_base", {}).items()})


def round_curves(number: int, states: Mapping[str, TaskState], bases: Mapping[str, int]) -> RoundCurves:
    """The curves of round ``number`` from the sites' final task states; ``bases``: each site's step base."""
    curves = RoundCurves(number, next_step_base=dict(bases))
    for site, state in sorted(states.items()):
        base = int(bases.get(site, 0))
        points = [_shifted(p, base) for p in state.history]
        curve = SiteCurve(base, points, {k: float(v) for k, v in state.metrics.items() if _finite(v)}, state.status)
        curves.sites[site] = curve
        curves.next_step_base[site] = curve.last_step + 1
    return curves


def _shifted(point: MetricPoint | Mapping[str, Any], base: int) -> dict[str, Any]:
    if not isinstance(point, MetricPoint):
        point = MetricPoint.from_dict(dict(point))
    return {"step": base + int(point.step), "time": float(point.time),
            "values": {k: float(v) for k, v in point.values.items() if _finite(v)}}


def _finite(value: Any) -> bool:
    try:
        return abs(float(value)) != float("inf") and float(value) == float(value)
    except (TypeError, ValueError):
        return False


def curves_name(number: int) -> str:
    return f"{CURVES_DIR}/{round_folder(number)}.json"


def save_curves(files: RunFiles, curves: RoundCurves) -> None:
    files.put_bytes(curves_name(curves.round), curves.to_json())


def load_curves(files: RunFiles, number: int) -> RoundCurves | None:
    """Round ``number``'s curves, or None when none were stored (or they are unreadable, with a warning)."""
    raw = files.get_bytes(curves_name(number))
    if raw is None:
        return None
    try:
        return RoundCurves.from_json(raw)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable training curves %s: %s", files.uri(curves_name(number)), exc)
        return None


def stored_rounds(files: RunFiles) -> list[int]:
    """The rounds whose curves are stored, in order."""
    rounds = []
    for name in files.list(CURVES_DIR):
        number = parse_round_folder(name.removesuffix(".json")) if name.endswith(".json") else None
        if number is not None:
            rounds.append(number)
    return sorted(rounds)


def step_bases_after(files: RunFiles, number: int) -> dict[str, int]:
    """Where each site's steps go on after round ``number`` (the newest curves at or before it)."""
    for stored in reversed([r for r in stored_rounds(files) if r <= number]):
        curves = load_curves(files, stored)
        if curves is not None:
            return dict(curves.next_step_base)
    return {}

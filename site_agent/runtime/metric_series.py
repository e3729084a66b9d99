"""A task's training curve as the site lets it leave: allowed names only, at a bounded size and rate.

The trainer's ``ctx.report(progress, step=..., **metrics)`` calls arrive at the agent as
they come (every batch, if the trainer wants). What travels on with the task's state is
thinned here, at the site, to what ``site.yaml`` allows::

    metrics:
      allow: ["train_*", "val_accuracy"]   # glob patterns of metric names (default: all)
      max_points: 500                      # points kept per task (default 500)
      points_per_second: 5                 # points taken per second at most (default 5)

Thinning keeps the curve's shape: points are taken at most ``points_per_second``, and once
``max_points`` are held every other one is dropped and only every second later point is
taken (the stride doubles), so what is kept stays evenly spread over the whole task. The
latest report is always the last point, whatever the rate and the stride.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flare_provider.wire.task_state import MetricPoint

from ..errors import SettingsError

DEFAULT_MAX_POINTS = 500
DEFAULT_POINTS_PER_SECOND = 5.0
_MAX_NAME_CHARS = 128


@dataclass(frozen=True)
class MetricsPolicy:
    """``site.yaml``'s ``metrics``: which metric names may leave the site, how many points, how often."""

    allow: tuple[str, ...] = ("*",)
    max_points: int = DEFAULT_MAX_POINTS
    points_per_second: float = DEFAULT_POINTS_PER_SECOND

    def allows(self, name: str) -> bool:
        return len(name) <= _MAX_NAME_CHARS and any(fnmatch.fnmatchcase(name, pattern) for pattern in self.allow)

    def allowed(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The metrics whose names the site lets leave."""
        return {name: value for name, value in metrics.items() if self.allows(name)}


def parse_metrics_policy(value: Any, source: str = "site.yaml") -> MetricsPolicy:
    """``site.yaml``'s ``metrics`` mapping (None: the defaults); :class:`SettingsError` naming the key at fault."""
    if value is None:
        return MetricsPolicy()
    if not isinstance(value, dict):
        raise SettingsError(f"{source}: 'metrics' must be a mapping with allow, max_points and points_per_second, found {value!r}")
    unknown = sorted(set(value) - {"allow", "max_points", "points_per_second"}, key=repr)
    if unknown:
        raise SettingsError(f"{source}: unknown key(s) {unknown} in 'metrics'; known: allow, max_points, points_per_second")
    allow = value.get("allow", ["*"])
    if not isinstance(allow, list) or not all(isinstance(p, str) and p for p in allow):
        raise SettingsError(f"{source}: 'metrics.allow' must be a list of name patterns such as ['train_*', 'val_accuracy'], found {allow!r}")
    max_points = value.get("max_points", DEFAULT_MAX_POINTS)
    if isinstance(max_points, bool) or not isinstance(max_points, int) or not 2 <= max_points <= 100_000:
        raise SettingsError(f"{source}: 'metrics.max_points' must be a whole number from 2 to 100000, found {max_points!r}")
    rate = value.get("points_per_second", DEFAULT_POINTS_PER_SECOND)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise SettingsError(f"{source}: 'metrics.points_per_second' must be a number above 0, found {rate!r}")
    return MetricsPolicy(tuple(allow), max_points, float(rate))


class MetricSeries:
    """The thinned curve of one task; :meth:`points` is what its state carries."""

    def __init__(self, policy: MetricsPolicy):
        self.policy = policy
        self._kept: list[MetricPoint] = []
        self._latest: MetricPoint | None = None
        self._stride = 1  # take every stride-th point that the rate lets through
        self._offered = 0  # points the rate let through so far
        self._last_taken_at: float | None = None
        self.dropped = 0  # reports not kept (for the agent's log)

    def add(self, step: int, metrics: Mapping[str, float], now: float) -> bool:
        """Offer one report; True when the points changed (it had a metric the site allows)."""
        values = {k: float(v) for k, v in self.policy.allowed(metrics).items() if math.isfinite(float(v))}
        if not values:
            return False
        point = MetricPoint(step=int(step), time=float(now), values=values)
        if self._latest is not None and self._latest is not self._tail():
            self.dropped += 1  # the previous latest point was not kept: this one replaces it
        self._latest = point
        if self._last_taken_at is not None and now - self._last_taken_at < 1.0 / self.policy.points_per_second:
            return True  # too soon: only the latest point changes
        self._last_taken_at = now
        self._offered += 1
        if (self._offered - 1) % self._stride == 0:
            self._kept.append(point)
            if len(self._kept) >= self.policy.max_points:  # the latest point needs room too
                self._kept = self._kept[::2]
                self._stride *= 2
        return True

    def _tail(self) -> MetricPoint | None:
        return self._kept[-1] if self._kept else None

    def points(self) -> list[MetricPoint]:
        """The kept points, oldest first, ending with the latest report; at most ``max_points``."""
        if self._latest is None or self._latest is self._tail():
            return list(self._kept)
        return [*self._kept, self._latest]

"""When a round stops waiting for sites: one rule, one tally, for the worker and the trigger alike.

The worker (following the sites' streams) and the deferrable trigger (polling them) feed
the same :class:`GatherTally` with each site's status as it changes, so both stop at the
same moment for the same reason. A site counts as succeeded when its task succeeded; the
worker, which also downloads and validates the result, records a rejected update as failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..wire.task_state import ABORTED, FAILED, SUCCEEDED, TERMINAL_STATUSES


@dataclass(frozen=True)
class GatherRule:
    """NVIDIA FLARE's ScatterAndGather rule.

    Wait for every site; or, once ``min_clients`` results are in, at most
    ``wait_time_after_min_received`` seconds more for stragglers; never past ``deadline``
    (a wall-clock time, seconds since the epoch).
    """

    min_clients: int
    wait_time_after_min_received: float
    deadline: float

    def done(self, statuses: Mapping[str, str], succeeded_since: float | None, now: float) -> str | None:
        """Why the round stops now, or None to keep waiting.

        ``statuses`` maps each site of the round to its task status; ``succeeded_since`` is
        when the ``min_clients``-th success arrived (None before that).
        """
        if all(s in TERMINAL_STATUSES for s in statuses.values()):
            return "all sites finished"
        if succeeded_since is not None and now - succeeded_since >= self.wait_time_after_min_received:
            return f"min_clients ({self.min_clients}) reached and the {self.wait_time_after_min_received:g}s grace period passed"
        if now >= self.deadline:
            return "train_timeout reached"
        still_possible = sum(1 for s in statuses.values() if s not in (FAILED, ABORTED))
        if still_possible < self.min_clients:
            return "too few sites can still finish"
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "GatherRule":
        return cls(int(doc["min_clients"]), float(doc["wait_time_after_min_received"]), float(doc["deadline"]))


class GatherTally:
    """The statuses of one round's sites as they arrive, judged by a :class:`GatherRule`."""

    def __init__(self, rule: GatherRule, sites: Iterable[str]):
        self.rule = rule
        self.statuses = {site: "queued" for site in sites}
        self.succeeded_since: float | None = None

    def record(self, site: str, status: str, now: float) -> None:
        self.statuses[site] = status
        if self.succeeded_since is None and self.succeeded >= self.rule.min_clients:
            self.succeeded_since = now

    @property
    def succeeded(self) -> int:
        return sum(1 for s in self.statuses.values() if s == SUCCEEDED)

    def verdict(self, now: float) -> str | None:
        """Why to stop now, or None to keep waiting."""
        return self.rule.done(self.statuses, self.succeeded_since, now)

    def seconds_to_next_check(self, now: float) -> float:
        """How long the verdict cannot change unless a status does: until the grace or the deadline ends."""
        ends = [self.rule.deadline]
        if self.succeeded_since is not None:
            ends.append(self.succeeded_since + self.rule.wait_time_after_min_received)
        return max(0.0, min(ends) - now)

    def summary(self) -> str:
        """``2 running, 1 succeeded``."""
        counts: dict[str, int] = {}
        for s in self.statuses.values():
            counts[s] = counts.get(s, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))

"""When a round stops waiting for sites: one rule for the worker and the trigger alike."""

from __future__ import annotations

from dataclasses import dataclass

TERMINAL = frozenset({"succeeded", "failed", "aborted"})


@dataclass(frozen=True)
class GatherPolicy:
    """NVIDIA FLARE's ScatterAndGather rule.

    Wait for every site; or, once ``min_clients`` results are in, at most
    ``wait_time_after_min_received`` seconds more for stragglers; never past ``deadline``
    (a wall-clock time, seconds since the epoch).
    """

    min_clients: int
    wait_time_after_min_received: float
    deadline: float

    def done(self, statuses: dict[str, str], succeeded_since: float | None, now: float) -> str | None:
        """Why the round stops now, or None to keep waiting.

        ``statuses`` maps each site of the round to its task status; ``succeeded_since`` is
        when the ``min_clients``-th success arrived (None before that).
        """
        if all(s in TERMINAL for s in statuses.values()):
            return "all sites finished"
        if succeeded_since is not None and now - succeeded_since >= self.wait_time_after_min_received:
            return f"min_clients ({self.min_clients}) reached and the {self.wait_time_after_min_received:g}s grace period passed"
        if now >= self.deadline:
            return "train_timeout reached"
        still_possible = sum(1 for s in statuses.values() if s not in ("failed", "aborted"))
        if still_possible < self.min_clients:
            return "too few sites can still finish"
        return None

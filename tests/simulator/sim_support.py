"""Helpers of the simulator tests (imported by name; conftest modules cannot be)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DIGITS_APP = REPO / "examples" / "apps" / "digits"
ONE_EPOCH = {"epochs": 1}  # the same model either way, in less time


def task_intervals(workspace: Path) -> list[tuple[str, float, float]]:
    """(task id, started, finished) of every task the simulated sites ran, from their task folders."""
    found = []
    for path in sorted(Path(workspace, "sites").glob("*/tasks/*/task.json")):
        state = json.loads(path.read_text())["state"]
        found.append((state["task_id"], state["started_at"], state["finished_at"]))
    return found


def most_at_once(intervals: list[tuple[str, float, float]]) -> int:
    """The largest number of tasks that were running at the same moment."""
    events = sorted([(start, 1) for _, start, _ in intervals] + [(end, -1) for _, _, end in intervals])
    running = peak = 0
    for _, change in events:  # at a tie an end sorts first: a task that starts as another ends does not overlap it
        running += change
        peak = max(peak, running)
    return peak

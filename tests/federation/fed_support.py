"""Helpers for the rounds tests (imported by name; conftest modules cannot be)."""

from __future__ import annotations


def trainings(fed, site: str) -> dict[str, int]:
    """How many times each train task was started by ``site``'s agent (from its log)."""
    import re

    counts: dict[str, int] = {}
    for match in re.finditer(r"task (\S+) running in process", fed.agent(site).log_path.read_text()):
        task_id = match.group(1)
        if not task_id.endswith(("-initialize", "-evaluate", "-describe")):
            counts[task_id] = counts.get(task_id, 0) + 1
    return counts

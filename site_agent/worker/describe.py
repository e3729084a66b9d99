"""A ``describe`` task: the trainer's summary of the site's data, without training.

The server asks every site for one before a run trains (``check_data`` of the run
operators), to stop a run whose sites' data disagree before anything trains. What
leaves the site is the trainer's :class:`~site_agent.trainer.DataSummary`: a sample count
and a schema, no data and no weights.
"""

from __future__ import annotations

import json
from typing import Any

from ..trainer import DataSummary, TaskContext

MAX_SUMMARY_BYTES = 64 << 10  # a schema, not a data set


def describe_info(trainer: Any, ctx: TaskContext) -> dict[str, Any]:
    """The result record of a describe task (``result.json``): the summary, checked."""
    from .task_runner import TaskFailure  # loaded already: this runs inside the worker

    describe = getattr(trainer, "describe", None)
    if describe is None:
        raise TaskFailure(f"trainer {type(trainer).__name__} has no describe(ctx) -> DataSummary: "
                          "the app cannot take part in a data check")
    summary = describe(ctx)
    if not isinstance(summary, DataSummary):
        raise TaskFailure(f"describe() returned {type(summary).__name__}, expected DataSummary")
    count = summary.num_samples
    if isinstance(count, bool) or not hasattr(count, "__index__") or int(count) < 0:
        raise TaskFailure(f"describe(): num_samples must be a whole number >= 0, got {count!r}")
    if not isinstance(summary.schema, dict):
        raise TaskFailure(f"describe(): schema must be a dict, got {type(summary.schema).__name__}")
    try:
        text = json.dumps(summary.schema, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TaskFailure(f"describe(): schema must be plain JSON data ({exc})") from None
    if len(text) > MAX_SUMMARY_BYTES:
        raise TaskFailure(f"describe(): schema is {len(text)} bytes as JSON, more than {MAX_SUMMARY_BYTES}")
    return {"kind": "summary", "num_samples": int(count), "metrics": {},
            "summary": {"num_samples": int(count), "schema": json.loads(text)}}

"""A run's step in flight handed to the triggerer, and taken up again when it fires.

Shared by the operators that defer (scatter-gather rounds, cyclic hops): the step
travels in ``defer(kwargs={"flight": ...})``; the trigger carries only what it watches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flare_provider.federation.records import InFlight


def defer_step(operator: Any, flare_conn_id: str, flight: "InFlight", rule: Mapping[str, Any], poll_interval: float) -> None:
    """Hand ``flight`` to a ``RoundTrigger``; Airflow calls ``operator.execute_complete`` when it fires."""
    from flare_provider.triggers.round import RoundTrigger

    operator.defer(
        trigger=RoundTrigger(flare_conn_id=flare_conn_id, task_ids=flight.active_tasks, rule=dict(rule),
                             poll_interval=poll_interval),
        method_name="execute_complete",
        kwargs={"flight": flight.to_dict()},
    )


def taken_up(flight: Mapping[str, Any] | None, event: Mapping[str, Any]) -> "InFlight":
    """The step a trigger watched: what the operator deferred with.

    dag.test() of Airflow 3.3.2 and earlier drops a deferral's kwargs when the trigger
    fires (apache/airflow#69942); the step is then rebuilt from what the trigger watched,
    without the reasons of sites dropped when it was sent.
    """
    from flare_provider.federation.records import InFlight

    return InFlight.from_dict(flight) if flight is not None else InFlight.from_watched(event)

"""``RoundTrigger``: watch a round's site tasks from the triggerer while the worker slot is free."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from flare_provider.federation.gather import TERMINAL, GatherPolicy


class RoundTrigger(BaseTrigger):
    """Fires when the round's gather rule says stop (see :class:`GatherPolicy`).

    Only ids and numbers are serialized; the server identity is read from the
    connection in the triggerer, so no key material lands in the metadata database.
    The event carries each site's last task state (``TaskInfo.to_dict()``) and
    ``round_info`` as given (what the operator needs to take the round up again).
    """

    def __init__(
        self,
        flare_conn_id: str,
        task_ids: dict[str, str],
        min_clients: int,
        wait_time_after_min_received: float,
        deadline: float,
        poll_interval: float = 2.0,
        round_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.flare_conn_id = flare_conn_id
        self.task_ids = dict(task_ids)
        self.min_clients = min_clients
        self.wait_time_after_min_received = wait_time_after_min_received
        self.deadline = deadline
        self.poll_interval = poll_interval
        self.round_info = dict(round_info or {})

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "flare_conn_id": self.flare_conn_id,
                "task_ids": self.task_ids,
                "min_clients": self.min_clients,
                "wait_time_after_min_received": self.wait_time_after_min_received,
                "deadline": self.deadline,
                "poll_interval": self.poll_interval,
                "round_info": self.round_info,
            },
        )

    async def _kit(self):
        from flare_provider.hooks.flare import FlareHook

        conn = await FlareHook.aget_connection(self.flare_conn_id)
        return FlareHook.kit_from_connection(conn)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        kit = await self._kit()
        clients = {site: kit.async_client(site) for site in self.task_ids}
        policy = GatherPolicy(self.min_clients, self.wait_time_after_min_received, self.deadline)
        last: dict[str, dict] = {}
        errors: dict[str, str] = {}
        succeeded_since = None
        try:
            while True:
                pending = [s for s in self.task_ids if last.get(s, {}).get("status") not in TERMINAL]
                answers = await asyncio.gather(
                    *(clients[s].get_task(self.task_ids[s]) for s in pending), return_exceptions=True
                )
                for site, answer in zip(pending, answers):
                    if isinstance(answer, Exception):
                        errors[site] = str(answer)  # a site may come back: keep asking until the deadline
                    else:
                        errors.pop(site, None)
                        last[site] = answer.to_dict()
                statuses = {s: last.get(s, {}).get("status", "unknown") for s in self.task_ids}
                done = sum(1 for s in statuses.values() if s == "succeeded")
                if succeeded_since is None and done >= self.min_clients:
                    succeeded_since = time.time()
                reason = policy.done(statuses, succeeded_since, time.time())
                if reason:
                    self.log.info("Round tasks: %s (%s)", reason, statuses)
                    yield TriggerEvent({"reason": reason, "tasks": last, "errors": errors, "round": self.round_info})
                    return
                await asyncio.sleep(self.poll_interval)
        finally:
            for client in clients.values():
                await client.close()

    async def on_kill(self) -> None:
        """The user stopped the task: stop the sites' trainings too."""
        kit = await self._kit()
        for site, task_id in self.task_ids.items():
            client = kit.async_client(site)
            try:
                await client.abort(task_id)
            except Exception as exc:  # best effort per site
                self.log.warning("Could not abort task %s on site %s: %s", task_id, site, exc)
            finally:
                await client.close()

"""``RoundTrigger``: watch a round's site tasks from the triggerer while the worker slot is free."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from flare_provider.federation.gather import GatherRule, GatherTally


class RoundTrigger(BaseTrigger):
    """Fires when the round's gather rule says stop (see :class:`GatherRule`).

    It carries only what watching needs: the connection id, each site's task id, the rule
    and the poll interval. The server identity is read from the connection in the
    triggerer, so no key material lands in the metadata database. The event holds the
    reason, the task ids it watched, each site's last task state (``TaskState.to_dict()``)
    under ``tasks`` and the sites that could not be reached under ``errors``; what the
    operator needs to take the round up again travels in the deferral's own ``kwargs``.
    """

    def __init__(
        self,
        flare_conn_id: str,
        task_ids: dict[str, str],
        rule: dict[str, Any],
        poll_interval: float = 2.0,
    ) -> None:
        super().__init__()
        self.flare_conn_id = flare_conn_id
        self.task_ids = dict(task_ids)
        self.rule = GatherRule.from_dict(rule)
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "flare_conn_id": self.flare_conn_id,
                "task_ids": self.task_ids,
                "rule": self.rule.to_dict(),
                "poll_interval": self.poll_interval,
            },
        )

    async def _kit(self):
        from flare_provider.hooks.flare import FlareHook

        return await FlareHook.aget_kit(self.flare_conn_id)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        kit = await self._kit()
        clients = {site: kit.async_client(site) for site in self.task_ids}
        tally = GatherTally(self.rule, self.task_ids)
        last: dict[str, Any] = {}
        errors: dict[str, str] = {}
        try:
            while True:
                pending = [s for s in self.task_ids if not (s in last and last[s].terminal)]
                answers = await asyncio.gather(
                    *(clients[s].get_task(self.task_ids[s]) for s in pending), return_exceptions=True
                )
                for site, answer in zip(pending, answers):
                    if isinstance(answer, Exception):
                        errors[site] = str(answer)  # a site may come back: keep asking until the deadline
                    else:
                        errors.pop(site, None)
                        last[site] = answer
                        tally.record(site, answer.status, time.time())
                reason = tally.verdict(time.time())
                if reason:
                    self.log.info("Round tasks: %s (%s)", reason, tally.summary())
                    yield TriggerEvent({
                        "reason": reason,
                        "task_ids": self.task_ids,
                        "tasks": {s: state.to_dict() for s, state in last.items()},
                        "errors": errors,
                    })
                    return
                await asyncio.sleep(min(self.poll_interval, max(0.05, tally.seconds_to_next_check(time.time()))))
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

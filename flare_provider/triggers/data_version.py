"""``DataVersionTrigger``: fire when enough sites report new training data.

An event trigger for an ``AssetWatcher``: the triggerer runs it for as long as the DAG
that declares the watched Asset exists; it asks every site's agent for its status (through
the relays the sites dial, with the server identity of the ``flare`` connection) each
``poll_interval`` seconds and yields an event each time the data version has changed at
``min_sites`` sites or more since the last event. Airflow turns each event into an event
of the watched Asset, and DAGs scheduled on that Asset run (``docs/assets.md``).

Where the versions seen are kept: in the watched Asset's state store (Airflow 3.3's
``asset_state_store``, in the metadata database), written after each event and read when
the trigger starts. So a triggerer restart, or the trigger moving to another triggerer,
compares the sites against the versions of the last event and misses no change made in
between. A trigger kwarg could not hold them (kwargs are fixed when the DAG is parsed),
and a baseline read at start would swallow every change made while no triggerer ran.
Without a state store (a trigger run on its own, or watching several assets) the first
answer of each site is the baseline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

STATE_KEY = "flare_data_versions"


def changed_sites(baseline: dict[str, str], versions: dict[str, str]) -> dict[str, dict[str, str]]:
    """The sites whose version differs from the baseline's: ``{site: {"from": old, "to": new}}``.

    A site first seen (no baseline version) or reporting no version is not a change.
    """
    return {site: {"from": baseline[site], "to": version}
            for site, version in sorted(versions.items())
            if version and baseline.get(site) and baseline[site] != version}


class DataVersionTrigger(BaseEventTrigger):
    """Fires when the data version changed at ``min_sites`` sites or more since the last event.

    :param flare_conn_id: the federation's ``flare`` connection (the server identity).
    :param min_sites: how many sites must have new data for an event.
    :param sites: the sites to watch (default: every site of the connection's kit).
    :param poll_interval: seconds between two rounds of status calls.
    :param timeout: seconds one status call may take; a site that does not answer is
        asked again at the next poll and keeps its last version meanwhile.

    The event's payload: ``changed`` (site -> ``{"from", "to"}``), ``versions`` (every
    site's version now, the baseline of the next event) and ``at`` (seconds since the epoch).
    """

    def __init__(
        self,
        flare_conn_id: str = "flare_default",
        min_sites: int = 1,
        sites: list[str] | None = None,
        poll_interval: float = 60.0,
        timeout: float = 10.0,
    ) -> None:
        super().__init__()
        problems = []
        if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 1:
            problems.append(f"min_sites must be a positive integer, got {min_sites!r}")
        if sites is not None and (isinstance(sites, str) or not sites or len(set(sites)) != len(sites)):
            problems.append(f"sites must be a list of distinct site names, got {sites!r}")
        elif sites is not None and isinstance(min_sites, int) and min_sites > len(sites):
            problems.append(f"min_sites ({min_sites}) is more than the {len(sites)} sites watched")
        for name, value in (("poll_interval", poll_interval), ("timeout", timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                problems.append(f"{name} must be a number of seconds > 0, got {value!r}")
        if problems:
            raise ValueError("DataVersionTrigger: " + "; ".join(problems))
        self.flare_conn_id = flare_conn_id
        self.min_sites = min_sites
        self.sites = list(sites) if sites is not None else None
        self.poll_interval = poll_interval
        self.timeout = timeout

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "flare_conn_id": self.flare_conn_id,
                "min_sites": self.min_sites,
                "sites": self.sites,
                "poll_interval": self.poll_interval,
                "timeout": self.timeout,
            },
        )

    # ---- the versions of the last event, kept in the watched Asset's state store --------

    async def _load_baseline(self) -> dict[str, str] | None:
        store = getattr(self, "asset_state_store", None)
        if store is None:
            return None
        try:
            stored = await store.aget(STATE_KEY)
        except ValueError as exc:  # several watched assets: no single store to use
            self.log.warning("Data versions are kept in memory only: %s", exc)
            return None
        return {str(k): str(v) for k, v in stored.items()} if isinstance(stored, dict) else None

    async def _save_baseline(self, versions: dict[str, str]) -> None:
        store = getattr(self, "asset_state_store", None)
        if store is not None:
            try:
                await store.aset(STATE_KEY, dict(versions))
            except ValueError:
                pass  # said so when loading

    # ---- watching -----------------------------------------------------------------------

    async def _poll(self, clients: dict[str, Any]) -> dict[str, str]:
        """Each answering site's data version ("" where it reports none)."""
        names = list(clients)
        answers = await asyncio.gather(*(clients[s].status(timeout=self.timeout) for s in names), return_exceptions=True)
        versions = {}
        for site, answer in zip(names, answers):
            if isinstance(answer, Exception):
                self.log.info("Site %s did not answer: %s", site, answer)
            else:
                versions[site] = answer.data_version
        return versions

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from flare_provider.hooks.flare import FlareHook

        kit = await FlareHook.aget_kit(self.flare_conn_id)
        sites = self.sites or sorted(kit.sites)
        unknown = [s for s in sites if s not in kit.sites]
        if unknown:
            raise ValueError(f"sites {unknown} are not in the kit of {self.flare_conn_id!r} (known: {sorted(kit.sites)})")
        if self.min_sites > len(sites):
            raise ValueError(f"min_sites ({self.min_sites}) is more than the {len(sites)} sites of {self.flare_conn_id!r}")
        clients = {site: kit.async_client(site) for site in sites}
        baseline = await self._load_baseline() or {}
        stored = dict(baseline)
        self.log.info("Watching the data versions of %s (an event at %d changed); last event's versions: %s",
                      ", ".join(sites), self.min_sites, baseline or "none")
        try:
            while True:
                versions = await self._poll(clients)
                changed = changed_sites(baseline, versions)
                # a site seen for the first time (or first with a version) joins the baseline
                baseline.update({s: v for s, v in versions.items() if v and not baseline.get(s)})
                if len(changed) >= self.min_sites:
                    baseline.update({s: v for s, v in versions.items() if v})
                    self.log.info("New data at %d sites: %s", len(changed), changed)
                    await self._save_baseline(baseline)
                    stored = dict(baseline)
                    yield TriggerEvent({"changed": changed, "versions": dict(baseline), "at": time.time()})
                elif baseline != stored:
                    await self._save_baseline(baseline)
                    stored = dict(baseline)
                await asyncio.sleep(self.poll_interval)
        finally:
            for client in clients.values():
                await client.close()

"""The sites' data versions, from the agents' status to ``DataVersionTrigger``'s events.

Real agents (dialling out to a real relay) report the version; the trigger asks them
through the relay with the server identity, as it does in the triggerer. Sites change
their data the two ways a site does: ``data_version`` in ``local/site.yaml``, or files in
the data folder.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from flare_provider.poc.processes import wait_for
from flare_provider.triggers.data_version import STATE_KEY, DataVersionTrigger, changed_sites


class StateStore:
    """The asset state store's async interface (``aget``/``aset``), kept in a dict: what a
    triggerer's store keeps across trigger restarts, here across two trigger instances."""

    def __init__(self):
        self.values: dict = {}

    async def aget(self, key, default=None):
        return self.values.get(key, default)

    async def aset(self, key, value):
        self.values[key] = value


def status(fed, site):
    with fed.client(site) as client:
        return client.status()


def touch_data(fed, site, name="new-batch.npz", content=b"more data"):
    (fed.data_dir(site) / name).write_bytes(content)


class Watching:
    """A trigger's run() in the background, its events collected."""

    def __init__(self, trigger: DataVersionTrigger):
        self.trigger, self.events = trigger, asyncio.Queue()

    async def __aenter__(self):
        async def collect():
            async for event in self.trigger.run():
                await self.events.put(event.payload)

        self.task = asyncio.create_task(collect())
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def next_event(self, timeout: float):
        if self.task.done():
            self.task.result()  # raises what ended the trigger
        return await asyncio.wait_for(self.events.get(), timeout)

    async def quiet_for(self, seconds: float) -> bool:
        await asyncio.sleep(seconds)
        if self.task.done():
            self.task.result()
        return self.events.empty()


async def until_stored(store: StateStore, sites, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (isinstance(store.values.get(STATE_KEY), dict) and set(store.values[STATE_KEY]) >= set(sites)):
        assert time.monotonic() < deadline, f"the trigger stored no baseline: {store.values}"
        await asyncio.sleep(0.1)
    return dict(store.values[STATE_KEY])


def test_agent_reports_the_data_version_from_site_yaml_or_the_listing(sites):
    site = sites.sites[0]
    sites.set_site_settings(site, data_version=None)  # where another test left one
    listed = wait_for("the listing's version", lambda: (s := status(sites, site)).data_version_source == "listing"
                      and s, timeout=20)
    assert listed.data_version.startswith("sha256:")
    assert listed.data_version_seen_at > 0
    # A new file in the data folder: a new digest, seen by the running agent.
    touch_data(sites, site, "extra.bin")
    relisted = wait_for("a new listing digest", lambda: (s := status(sites, site)).data_version != listed.data_version
                        and s, timeout=20)
    assert relisted.data_version.startswith("sha256:") and relisted.data_version_seen_at >= listed.data_version_seen_at
    # The site states its version: site.yaml wins over the listing, without a restart.
    sites.set_site_settings(site, data_version="2026-03")
    stated = wait_for("the stated version", lambda: (s := status(sites, site)).data_version == "2026-03" and s, timeout=20)
    assert stated.data_version_source == "site.yaml"
    sites.set_site_settings(site, data_version=None)
    back = wait_for("the listing again", lambda: (s := status(sites, site)).data_version_source == "listing" and s,
                    timeout=20)
    assert back.data_version == relisted.data_version


def test_trigger_fires_once_enough_sites_changed_and_resumes_from_its_store(sites):
    a, b = sites.sites
    store = StateStore()

    async def scenario():
        trigger = DataVersionTrigger(flare_conn_id=sites.conn_id, min_sites=2, poll_interval=0.2, timeout=5)
        trigger.asset_state_store = store
        async with Watching(trigger) as watching:
            baseline = await until_stored(store, sites.sites)
            touch_data(sites, a, "batch-2.npz")
            assert await watching.quiet_for(4.0), "one changed site is fewer than min_sites=2"
            sites.set_site_settings(b, data_version="b-2")
            event = await watching.next_event(timeout=20)
        assert set(event["changed"]) == {a, b}
        assert event["changed"][a]["from"] == baseline[a] and event["changed"][a]["to"].startswith("sha256:")
        assert event["changed"][b] == {"from": baseline[b], "to": "b-2"}
        assert event["versions"] == store.values[STATE_KEY] == {a: event["changed"][a]["to"], b: "b-2"}

        # No trigger runs while a site changes its data; a new one (a triggerer restart, with
        # the same state store) compares against the last event's versions and fires at once.
        sites.set_site_settings(a, data_version="a-3")
        time.sleep(2.5)  # the agent's listing/settings cache
        restarted = DataVersionTrigger(flare_conn_id=sites.conn_id, min_sites=1, poll_interval=0.2, timeout=5)
        restarted.asset_state_store = store
        async with Watching(restarted) as watching:
            again = await watching.next_event(timeout=20)
            assert again["changed"] == {a: {"from": event["versions"][a], "to": "a-3"}}
            assert await watching.quiet_for(1.0), "an event is raised once per change"
        return again

    again = asyncio.run(scenario())
    assert again["versions"] == {a: "a-3", b: "b-2"}


def test_without_a_store_the_first_answers_are_the_baseline(sites):
    a = sites.sites[0]

    async def scenario():
        trigger = DataVersionTrigger(flare_conn_id=sites.conn_id, min_sites=1, sites=[a], poll_interval=0.2)
        async with Watching(trigger) as watching:
            assert await watching.quiet_for(1.0), "the versions found at start are no change"
            sites.set_site_settings(a, data_version="a-4")
            return await watching.next_event(timeout=20)

    event = asyncio.run(scenario())
    assert event["changed"][a]["to"] == "a-4" and list(event["versions"]) == [a]


def test_trigger_serializes_to_what_it_was_built_with():
    trigger = DataVersionTrigger(flare_conn_id="flare_x", min_sites=2, sites=["s1", "s2"], poll_interval=30)
    path, kwargs = trigger.serialize()
    assert path == "flare_provider.triggers.data_version.DataVersionTrigger"
    assert DataVersionTrigger(**kwargs).serialize() == (path, kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"min_sites": 0}, "min_sites must be a positive integer"),
     ({"sites": ["a", "a"]}, "sites must be a list of distinct site names"),
     ({"sites": ["a"], "min_sites": 2}, r"min_sites \(2\) is more than the 1 sites watched"),
     ({"poll_interval": 0}, "poll_interval must be a number of seconds > 0")],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataVersionTrigger(flare_conn_id="flare_x", **kwargs)


def test_a_min_sites_above_the_federation_is_refused_when_it_runs(sites):
    async def first_event():
        async for event in DataVersionTrigger(flare_conn_id=sites.conn_id, min_sites=3).run():
            return event

    with pytest.raises(ValueError, match=r"min_sites \(3\) is more than the 2 sites"):
        asyncio.run(first_event())


def test_changes_count_only_against_a_known_version():
    assert changed_sites({"a": "1", "b": "1"}, {"a": "2", "b": "1", "c": "9"}) == {"a": {"from": "1", "to": "2"}}
    assert changed_sites({"a": "1"}, {"a": ""}) == {}  # a site that reports none has not changed its data

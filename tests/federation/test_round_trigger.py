"""RoundTrigger on its own: what it serializes, and when its run() fires, against scripted async clients."""

from __future__ import annotations

import asyncio
import time
from importlib import import_module

import pytest

from flare_provider.client import AgentError
from flare_provider.federation.gather import GatherRule
from flare_provider.federation.records import InFlight
from flare_provider.triggers.round import RoundTrigger
from flare_provider.wire.task_state import TaskState

TASK_IDS = {"a": "run-r0003-a", "b": "run-r0003-b", "c": "run-r0003-c"}


def state(task_id: str, status: str, **fields) -> TaskState:
    doc = dict(task_id=task_id, app_name="digits", app_version="v1", round=3, kind="train", status=status, progress=0.5,
               metrics={}, error=None, gpus=[], num_samples=10, result_available=status == "succeeded", seq=1,
               created_at=1000.0, started_at=None, finished_at=None)
    return TaskState(**{**doc, **fields})


class ScriptedClient:
    """Answers get_task with the next status of its script (the last one repeats); "down" raises."""

    def __init__(self, site: str, script: list[str]):
        self.site, self.script, self.calls, self.aborted, self.closed = site, list(script), 0, [], False

    async def get_task(self, task_id: str) -> TaskState:
        status = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if status == "down":
            import grpc

            raise AgentError(self.site, "GetTask", grpc.StatusCode.UNAVAILABLE, "connection refused")
        return state(task_id, status)

    async def abort(self, task_id: str) -> TaskState:
        self.aborted.append(task_id)
        return state(task_id, "aborted")

    async def close(self) -> None:
        self.closed = True


class ScriptedKit:
    def __init__(self, scripts: dict[str, list[str]]):
        self.clients = {site: ScriptedClient(site, script) for site, script in scripts.items()}

    def async_client(self, site: str) -> ScriptedClient:
        return self.clients[site]


def trigger(min_clients=3, grace=0.0, deadline_in=30.0) -> RoundTrigger:
    rule = GatherRule(min_clients, grace, time.time() + deadline_in)
    return RoundTrigger(flare_conn_id="flare_test", task_ids=TASK_IDS, rule=rule.to_dict(), poll_interval=0.01)


def run_trigger(monkeypatch, t: RoundTrigger, scripts: dict[str, list[str]]) -> tuple[dict, ScriptedKit]:
    kit = ScriptedKit(scripts)

    async def fake_kit(self):
        return kit

    monkeypatch.setattr(RoundTrigger, "_kit", fake_kit)

    async def first_event():
        async for event in t.run():
            return event.payload

    return asyncio.run(asyncio.wait_for(first_event(), 10)), kit


def test_serialize_round_trip():
    t = trigger(min_clients=2, grace=5.0)
    classpath, kwargs = t.serialize()
    assert classpath == "flare_provider.triggers.round.RoundTrigger"
    assert set(kwargs) == {"flare_conn_id", "task_ids", "rule", "poll_interval"}  # ids and numbers, no key material
    module, _, name = classpath.rpartition(".")
    again = getattr(import_module(module), name)(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    assert again.rule == t.rule


def test_fires_when_every_site_finished(monkeypatch):
    payload, kit = run_trigger(monkeypatch, trigger(min_clients=2, grace=60.0), {"a": ["running", "succeeded"], "b": ["succeeded"], "c": ["failed"]})
    assert payload["reason"] == "all sites finished"
    assert payload["task_ids"] == TASK_IDS
    assert {s: doc["status"] for s, doc in payload["tasks"].items()} == {"a": "succeeded", "b": "succeeded", "c": "failed"}
    assert TaskState.from_dict(payload["tasks"]["a"]) == state(TASK_IDS["a"], "succeeded")
    assert payload["errors"] == {}
    assert kit.clients["b"].calls == 1  # a finished site is not asked again
    assert all(c.closed for c in kit.clients.values())


def test_grace_after_min_clients(monkeypatch):
    payload, _ = run_trigger(monkeypatch, trigger(min_clients=2, grace=0.05),
                             {"a": ["succeeded"], "b": ["succeeded"], "c": ["running"]})
    assert "grace period passed" in payload["reason"]
    assert payload["tasks"]["c"]["status"] == "running"


def test_unreachable_site_is_reported_and_too_few_left(monkeypatch):
    payload, _ = run_trigger(monkeypatch, trigger(min_clients=3), {"a": ["succeeded"], "b": ["down"], "c": ["aborted"]})
    assert payload["reason"] == "too few sites can still finish"
    assert "UNAVAILABLE" in payload["errors"]["b"] and "b" not in payload["tasks"]


def test_deadline(monkeypatch):
    payload, _ = run_trigger(monkeypatch, trigger(deadline_in=0.05), {"a": ["running"], "b": ["queued"], "c": ["down"]})
    assert payload["reason"] == "train_timeout reached"


def test_on_kill_aborts_every_task(monkeypatch):
    t = trigger()
    kit = ScriptedKit({s: ["running"] for s in TASK_IDS})

    async def fake_kit(self):
        return kit

    monkeypatch.setattr(RoundTrigger, "_kit", fake_kit)
    asyncio.run(t.on_kill())
    assert {s: c.aborted for s, c in kit.clients.items()} == {s: [tid] for s, tid in TASK_IDS.items()}


def test_round_rebuilt_from_what_the_trigger_watched():
    event = {"reason": "all sites finished", "task_ids": TASK_IDS,
             "tasks": {s: state(t, "succeeded").to_dict() for s, t in TASK_IDS.items()}, "errors": {}}
    flight = InFlight.from_watched(event)
    assert (flight.round, flight.task_ids, flight.started_at) == (3, TASK_IDS, 1000.0)
    assert InFlight.from_dict(flight.to_dict()) == flight


@pytest.mark.parametrize("event", [{"reason": "train_timeout reached", "tasks": {}, "errors": {"a": "down"}}])
def test_round_not_rebuilt_without_any_site_state(event):
    from flare_provider.federation.errors import RoundFailed

    with pytest.raises(RoundFailed, match="reached no site"):
        InFlight.from_watched(event)

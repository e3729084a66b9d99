"""Helpers for the relay tests (imported by name; conftest modules cannot be)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from flare_provider.client import load_caller_kit
from flare_provider.federation.records import RunSpec
from flare_provider.federation.scatter_gather import ScatterGatherRun
from flare_provider.poc import prepare
from flare_provider.relay.dial import dial_relay
from flare_provider.relay.server import Relay
from flare_provider.relay.tls import TlsIdentity
from flare_provider.snapshots import SnapshotStore
from flare_provider.wire.tensors import save_file

APP = Path(__file__).parent / "apps" / "slow_plus_one"
RELAYS = ("airflow-server", "airflow-server-2")


def outbound_federation(root, name: str, num_relays: int):
    """Three outbound sites attached to ``num_relays`` relays, the test app deployed; stopped on exit."""
    fed = prepare(root, f"{name}_{uuid.uuid4().hex[:6]}", 3, digits_data=False, connect="outbound", num_relays=num_relays)
    for site in fed.sites:
        # The test app brings its own code and imports numpy only.
        fed.set_site_settings(site, allow_custom_code=True, preload_modules=[])
        fed.data_dir(site).mkdir(exist_ok=True)
    try:  # the relays start before the agents: stopped also when an agent does not come up
        fed.start_agents()
        fed.deploy_app(APP)
        yield fed
    finally:
        fed.stop_agents()


def server_identity(fed) -> TlsIdentity:
    kit = load_caller_kit(fed.server_kit)
    return TlsIdentity(kit.cert_pem, kit.key_pem, kit.root_ca_pem)


def relay_endpoint(fed, server: str):
    (relay,) = [r for r in load_caller_kit(fed.server_kit).relays if r.name == server]
    return relay


def relay_status(fed, server: str, identity: TlsIdentity | None = None) -> dict:
    """What relay ``server`` says of its attached sites."""

    async def ask():
        identity_ = identity or server_identity(fed)
        reader, writer, reply = await dial_relay(relay_endpoint(fed, server), identity_.context(server_side=False),
                                                 {"op": "status"})
        writer.close()
        return reply

    return asyncio.run(ask())


def attached(fed, server: str) -> dict[str, dict]:
    try:
        return {s["site"]: s for s in relay_status(fed, server)["sites"]}
    except OSError:
        return {}


def wait_attached(fed, server: str, sites, timeout: float = 60.0, since: float = 0.0) -> dict[str, dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = attached(fed, server)
        if all(s in now and now[s]["since"] > since for s in sites):
            return now
        time.sleep(0.2)
    raise AssertionError(f"sites {list(sites)} not attached to {server} within {timeout}s: {attached(fed, server)}")


def run_rounds(fed, tmp_path: Path, rounds: int = 1, *, run_id: str | None = None, sleep_s: float = 0.0,
               client_factory=None, **spec_args):
    """``rounds`` scatter-gather rounds of the test app through the relays; the run's progress."""
    initial = tmp_path / "initial.safetensors"
    if not initial.exists():
        save_file({"w": np.arange(4096, dtype=np.float32)}, initial)
    spec = RunSpec(federation="relayed", run_id=run_id or uuid.uuid4().hex, app_name="slow_plus_one", sites=fed.sites,
                   num_rounds=rounds, min_clients=spec_args.pop("min_clients", len(fed.sites)),
                   train_config={"sleep_s": sleep_s}, **spec_args)
    store = SnapshotStore(f"file://{tmp_path}/snapshots")
    with ScatterGatherRun(spec, load_caller_kit(fed.server_kit), store, initial_model=str(initial),
                          client_factory=client_factory) as run:
        return run.run_rounds(run.restore())


class InProcessRelay:
    """A relay in this process (its own event loop thread), recording every byte it copies."""

    def __init__(self, name: str, identity: TlsIdentity, port: int):
        self.copied: list[bytes] = []
        self.relay = Relay(name, identity, tap=lambda conn, data: self.copied.append(bytes(data)))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.relay.start("127.0.0.1", port), self.loop).result(10)

    def stop(self) -> None:
        async def shutdown():
            await self.relay.close()
            paths = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in paths:
                task.cancel()
            await asyncio.gather(*paths, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

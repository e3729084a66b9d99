"""Dialling out: the site's attachments to its relays, and the paths callers open through them.

With ``connect: outbound`` (site.yaml) the agent listens on a Unix socket only, and this
connector keeps one attachment per relay of the kit: a TLS connection (through the HTTP
proxy the site names for that relay, if any: see ``site_agent.relay_proxies``) on which
the relay asks for paths and the site pings. For each path the site dials a fresh data
connection to the relay (plain TCP with the path's one-time token, or TLS with
``relay_data: tls``) and joins it to the local agent; the caller's mutual TLS with the
agent runs inside, end to end. A relay that goes away is dialled again with jittered
backoff. The site opens no port at all.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flare_provider.relay.dial import HttpProxy, RelayEndpoint, dial_relay, join_path
from flare_provider.relay.loops import new_event_loop
from flare_provider.relay.protocol import (
    PING_INTERVAL_S,
    PING_TIMEOUT_S,
    RelayProtocolError,
    read_message,
    write_message,
)
from flare_provider.relay.splice import BUFFER_LIMIT, splice, splice_sockets
from flare_provider.relay.tls import TlsIdentity

from ..relay_proxies import route

log = logging.getLogger(__name__)

_BACKOFF_MIN_S, _BACKOFF_MAX_S = 1.0, 60.0


@dataclass
class AttachmentState:
    """How one relay attachment stands, for status and the Federation page."""

    relay: RelayEndpoint
    attached: bool = False
    connected_since: float = 0.0
    last_ping: float = 0.0
    error: str = ""


class OutboundConnector:
    """Keeps ``site`` attached to every relay in ``relays``, joining paths to the agent at ``agent_socket``."""

    def __init__(
        self,
        site: str,
        relays: Sequence[RelayEndpoint],
        identity: TlsIdentity,
        agent_socket: str,
        *,
        proxies: Mapping[str, HttpProxy | None] | None = None,
        ping_interval: float = PING_INTERVAL_S,
        relay_data: str = "plain",
    ):
        self.site = site
        self.agent_socket = agent_socket
        # by relay name: the proxy to dial that relay through, None (or absent) to dial it directly
        self.proxies = dict(proxies or {})
        self.relay_data = relay_data  # "tls": data connections look like TLS too, for proxies that insist
        self.ping_interval = ping_interval
        self.states = {relay.name: AttachmentState(relay) for relay in relays}
        self._context = identity.context(server_side=False)
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._run, name="flare-outbound", daemon=True)
        self._stopping: asyncio.Event | None = None
        self._paths: set[asyncio.Task] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        tasks = [asyncio.create_task(self._stay_attached(state)) for state in self.states.values()]
        await self._stopping.wait()
        for task in [*tasks, *self._paths]:
            task.cancel()
        await asyncio.gather(*tasks, *self._paths, return_exceptions=True)

    # ---- one relay ------------------------------------------------------------------

    async def _stay_attached(self, state: AttachmentState) -> None:
        relay, failures = state.relay, 0
        while True:
            try:
                reader, writer, _ = await dial_relay(relay, self._context, {"op": "attach", "site": self.site},
                                                 self.proxies.get(relay.name))
            except (RelayProtocolError, OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
                failures += 1
                state.error = _reason(exc)
                delay = min(_BACKOFF_MAX_S, _BACKOFF_MIN_S * 2 ** min(failures - 1, 6)) * random.uniform(0.5, 1.5)
                log.warning("Site %s: cannot attach to relay %s at %s%s: %s; retrying in %.1fs", self.site, relay.name,
                            relay.address, self._via(relay), state.error, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            state.attached, state.connected_since, state.last_ping, state.error = True, time.time(), time.time(), ""
            log.info("Site %s: attached to relay %s at %s%s", self.site, relay.name, relay.address, self._via(relay))
            try:
                await self._serve_attachment(state, reader, writer)
            except (RelayProtocolError, OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
                state.error = _reason(exc)
            finally:
                state.attached = False
                writer.close()
            log.warning("Site %s: lost relay %s (%s); attaching again", self.site, relay.name, state.error or "closed")
            await asyncio.sleep(random.uniform(0.2, 1.0))

    async def _serve_attachment(self, state: AttachmentState, reader, writer) -> None:
        lock = asyncio.Lock()
        pinger = asyncio.create_task(self._ping(state, writer, lock))
        try:
            while True:
                # A pong is due within ping_interval + PING_TIMEOUT_S: silence longer than that is a dead path.
                message = await asyncio.wait_for(read_message(reader), self.ping_interval + PING_TIMEOUT_S)
                if message.get("op") == "pong":
                    state.last_ping = time.time()
                elif message.get("op") == "open":
                    path = asyncio.create_task(self._join(state.relay, message))
                    self._paths.add(path)
                    path.add_done_callback(self._paths.discard)
        finally:
            pinger.cancel()

    async def _ping(self, state: AttachmentState, writer, lock: asyncio.Lock) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            async with lock:
                await write_message(writer, {"op": "ping"})

    async def _join(self, relay: RelayEndpoint, message: dict) -> None:
        """A caller asked for a path: join it with a data connection and carry it to the local agent."""
        conn, token = str(message.get("conn")), message.get("token")
        proxy = self.proxies.get(relay.name)
        try:
            if self.relay_data == "tls" or not token:
                relay_end = await dial_relay(relay, self._context, {"op": "data", "conn": conn}, proxy)
            else:
                relay_end = await join_path(relay, str(token), proxy)
        except (RelayProtocolError, OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            log.warning("Site %s: path %s through relay %s failed: %s", self.site, conn, relay.name, _reason(exc))
            return
        agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        agent.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(agent, self.agent_socket)
        except OSError as exc:
            log.error("Site %s: the agent's socket %s does not answer: %s", self.site, self.agent_socket, exc)
            agent.close()
            (relay_end if isinstance(relay_end, socket.socket) else relay_end[1]).close()
            return
        if isinstance(relay_end, socket.socket):
            await splice_sockets(relay_end, agent)
        else:
            agent_reader, agent_writer = await asyncio.open_unix_connection(sock=agent, limit=BUFFER_LIMIT)
            await splice(relay_end[0], relay_end[1], agent_reader, agent_writer)

    def _via(self, relay: RelayEndpoint) -> str:
        return f" {route(self.proxies.get(relay.name))}"


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


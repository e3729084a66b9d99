"""The Airflow side's way to a site behind relays: a local entrance gRPC channels dial.

gRPC channels cannot be handed a connection, only an address; so for each site the
tunnel opens a Unix socket in a private folder of this process, and every connection a
channel makes there is carried to the site through the first relay (of the kit's list)
the site is attached to. The channel's own mutual TLS with the agent runs inside, end to
end: the relay in between sees only ciphertext. One event loop thread per tunnel serves
every site, for sync clients and triggers alike.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Sequence

from ..files import safe_name
from .dial import RelayEndpoint, dial_relay, join_path
from .loops import new_event_loop
from .protocol import RelayProtocolError
from .splice import splice_sockets
from .tls import TlsIdentity

log = logging.getLogger(__name__)


class NoRelayPath(ConnectionError):
    """No relay of the kit has a path to the site."""


class RelayTunnel:
    """Local entrances to the sites behind ``relays``, for the caller ``identity``."""

    def __init__(self, relays: Sequence[RelayEndpoint], identity: TlsIdentity):
        if not relays:
            raise ValueError("a tunnel needs at least one relay")
        self.relays = tuple(relays)
        self.identity = identity
        self._context = identity.context(server_side=False)
        self._folder = tempfile.mkdtemp(prefix="flare-tunnel-")  # 0700: only this user reaches the sockets
        self._addresses: dict[str, str] = {}
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task] = set()  # held: the loop keeps only weak references
        self._preferred: dict[str, int] = {}  # site -> index of the relay that last worked
        self._lock = threading.Lock()
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="flare-relay-tunnel", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # the loop must stop before the interpreter tears its thread down

    def address(self, site: str) -> str:
        """A gRPC target for ``site`` (``unix:/...``), opening its entrance on first use."""
        with self._lock:
            if site not in self._addresses:
                path = os.path.join(self._folder, f"{safe_name(site)[:80]}.sock")
                asyncio.run_coroutine_threadsafe(self._listen(site, path), self._loop).result(timeout=10)
                self._addresses[site] = f"unix:{path}"
            return self._addresses[site]

    def close(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._cancel_tasks(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()
        for listener in self._listeners:  # after the loop: nothing waits on them any more
            listener.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    async def _listen(self, site: str, path: str) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)
        listener.setblocking(False)
        self._listeners.append(listener)
        self._spawn(self._accept(site, listener))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, site: str, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                channel, _ = await loop.sock_accept(listener)
            except OSError:
                if listener.fileno() < 0:  # closed: the tunnel is going away
                    return
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._carry(site, channel))

    async def _carry(self, site: str, channel: socket.socket) -> None:
        try:
            relay_sock, relay = await self.open_path(site)
        except NoRelayPath as exc:
            log.warning("%s", exc)
            channel.close()  # the channel sees the connection fail and reports UNAVAILABLE
            return
        log.debug("Path to %s through relay %s", site, relay.name)
        await splice_sockets(channel, relay_sock)

    async def open_path(self, site: str) -> tuple[socket.socket, RelayEndpoint]:
        """A data connection through a relay that the site is attached to, trying the last good relay first."""
        start = self._preferred.get(site, 0)
        order = [self.relays[(start + i) % len(self.relays)] for i in range(len(self.relays))]
        reasons = []
        for index, relay in enumerate(order):
            try:
                _, writer, reply = await dial_relay(relay, self._context, {"op": "open", "site": site})
                writer.close()
                sock = await join_path(relay, str(reply.get("token")))
            except (RelayProtocolError, OSError, asyncio.TimeoutError) as exc:
                reasons.append(f"{relay.name} ({relay.address}): {exc or type(exc).__name__}")
                continue
            self._preferred[site] = (start + index) % len(self.relays)
            return sock, relay
        raise NoRelayPath(f"no relay has a path to site {site!r}: " + "; ".join(reasons))

    async def relay_status(self, relay: RelayEndpoint) -> dict:
        """What ``relay`` says of its attached sites."""
        reader, writer, reply = await dial_relay(relay, self._context, {"op": "status"})
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return reply

    def run(self, coro, timeout: float | None = None):
        """Run a coroutine on the tunnel's loop from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)


_tunnels: dict[tuple, RelayTunnel] = {}
_tunnels_lock = threading.Lock()


def tunnel_for(relays: Sequence[RelayEndpoint], identity: TlsIdentity) -> RelayTunnel:
    """The process's tunnel for these relays and this caller (one per pair, shared by all clients)."""
    key = (tuple(relays), identity.cert_pem)
    with _tunnels_lock:
        if key not in _tunnels:
            _tunnels[key] = RelayTunnel(relays, identity)
        return _tunnels[key]

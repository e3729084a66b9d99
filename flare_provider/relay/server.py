"""The relay: where sites attach (dialling out), and where the Airflow side asks for a path to them.

A relay holds no federation state and never a key that opens what it carries: it checks
who connects (project certificates), keeps each site's attachment, and for a caller's
path pairs the caller's connection with a fresh data connection the site opens, then
copies bytes both ways through bounded buffers. Its memory does not grow with model size.
No Airflow here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..provisioning.certs import PeerIdentity
from .loops import new_event_loop
from .protocol import OPEN_TIMEOUT_S, RelayProtocolError, read_message, write_message
from .splice import BUFFER_LIMIT, splice
from .tls import TlsIdentity, peer_identity

log = logging.getLogger(__name__)

ADMIN_ROLES = frozenset({"project_admin", "org_admin", "lead", "member"})
_HANDSHAKE_TIMEOUT_S = 15.0


@dataclass
class Attachment:
    """A site's control connection to this relay."""

    site: str
    address: str
    writer: asyncio.StreamWriter = field(repr=False)
    since: float = field(default_factory=time.time)
    last_ping: float = field(default_factory=time.time)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def describe(self) -> dict[str, Any]:
        return {"site": self.site, "address": self.address, "since": self.since, "last_ping": self.last_ping}


@dataclass
class _PendingPath:
    site: str
    data: asyncio.Future  # (reader, writer) of the site's data connection
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Relay:
    """One relay process's state: attached sites and paths being set up.

    :param name: the server participant this relay runs as (its certificate's name).
    :param tap: called with each chunk the relay copies (tests look for plaintext in it).
    """

    def __init__(self, name: str, identity: TlsIdentity, *, tap: Callable[[str, bytes], None] | None = None):
        self.name = name
        self.identity = identity
        self.tap = tap
        self.attachments: dict[str, Attachment] = {}
        self._pending: dict[str, _PendingPath] = {}
        self._ids = itertools.count(1)
        self.bytes_relayed = 0
        self.open_paths = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (useful with port 0)."""
        self.server = await asyncio.start_server(self._handle, host, port, ssl=self.identity.context(server_side=True),
                                                 ssl_handshake_timeout=_HANDSHAKE_TIMEOUT_S, limit=BUFFER_LIMIT)
        bound = self.server.sockets[0].getsockname()[1]
        log.info("Relay %s listening on %s:%d", self.name, host, bound)
        return bound

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for attachment in list(self.attachments.values()):
                attachment.writer.close()
            await self.server.wait_closed()

    # ---- connections ----------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = _address(writer)
        try:
            peer = peer_identity(writer.get_extra_info("ssl_object"))
            hello = await asyncio.wait_for(read_message(reader), _HANDSHAKE_TIMEOUT_S)
            op = hello.get("op")
            if op == "attach":
                await self._attach(peer, hello, address, reader, writer)
            elif op == "data":
                await self._data(peer, hello, reader, writer)
            elif op == "open":
                await self._open(peer, hello, address, reader, writer)
            elif op == "status":
                self._require_caller(peer)
                await write_message(writer, {"ok": True, "relay": self.name, "paths": self.open_paths,
                                             "bytes": self.bytes_relayed,
                                             "sites": [a.describe() for a in self.attachments.values()]})
            else:
                raise RelayProtocolError(f"unknown request {op!r}")
        except (RelayProtocolError, PermissionError, LookupError) as exc:
            log.warning("Relay %s refused %s: %s", self.name, address, exc)
            with contextlib.suppress(Exception):
                await write_message(writer, {"ok": False, "error": str(exc)})
        except (ConnectionError, ssl.SSLError, asyncio.TimeoutError, OSError) as exc:
            log.info("Relay %s: connection from %s ended: %s", self.name, address, exc or type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _attach(self, peer: PeerIdentity, hello: dict, address: str, reader, writer) -> None:
        site = hello.get("site")
        if peer.kind != "client" or peer.name != site:
            raise PermissionError(f"{peer.kind} {peer.name!r} may not attach as site {site!r}")
        attachment = Attachment(site, address, writer)
        previous = self.attachments.get(site)
        self.attachments[site] = attachment
        if previous is not None:  # the site reconnected before the old connection was seen dead
            previous.writer.close()
        await write_message(writer, {"ok": True, "relay": self.name})
        log.info("Relay %s: site %s attached from %s", self.name, site, address)
        try:
            while True:
                message = await read_message(reader)
                if message.get("op") == "ping":
                    attachment.last_ping = time.time()
                    async with attachment.lock:
                        await write_message(writer, {"op": "pong"})
        except RelayProtocolError as exc:
            log.info("Relay %s: site %s detached (%s)", self.name, site, exc)
        finally:
            if self.attachments.get(site) is attachment:
                del self.attachments[site]

    async def _open(self, peer: PeerIdentity, hello: dict, address: str, reader, writer) -> None:
        self._require_caller(peer)
        site = hello.get("site")
        attachment = self.attachments.get(site)
        if attachment is None:
            raise LookupError(f"site {site!r} is not attached to relay {self.name}")
        conn = f"{next(self._ids)}-{secrets.token_hex(8)}"
        pending = _PendingPath(site, asyncio.get_running_loop().create_future())
        self._pending[conn] = pending
        try:
            async with attachment.lock:
                await write_message(attachment.writer, {"op": "open", "conn": conn})
            try:
                site_reader, site_writer = await asyncio.wait_for(pending.data, OPEN_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise LookupError(f"site {site!r} did not open a path within {OPEN_TIMEOUT_S:g}s") from None
            await write_message(writer, {"ok": True, "relay": self.name})
            log.debug("Relay %s: path %s from %s (%s) to %s", self.name, conn, peer.name, address, site)
            self.open_paths += 1
            try:
                self.bytes_relayed += await splice(reader, writer, site_reader, site_writer, self._tap_for(conn))
            finally:
                self.open_paths -= 1
        finally:
            self._pending.pop(conn, None)
            pending.done.set()

    async def _data(self, peer: PeerIdentity, hello: dict, reader, writer) -> None:
        pending = self._pending.get(hello.get("conn"))
        if pending is None or pending.data.done():
            raise LookupError(f"no path {hello.get('conn')!r} is waiting")
        if peer.kind != "client" or peer.name != pending.site:
            raise PermissionError(f"{peer.kind} {peer.name!r} may not open a path for site {pending.site!r}")
        await write_message(writer, {"ok": True})
        pending.data.set_result((reader, writer))
        await pending.done.wait()  # the caller's side splices, then lets this connection go

    def _require_caller(self, peer: PeerIdentity) -> None:
        if peer.kind == "server" or (peer.kind == "admin" and peer.role in ADMIN_ROLES):
            return
        raise PermissionError(f"{peer.kind} {peer.name!r} (role {peer.role!r}) may not open paths to sites")

    def _tap_for(self, conn: str) -> Callable[[bytes], None] | None:
        return None if self.tap is None else (lambda data: self.tap(conn, data))


def _address(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def run_relay(name: str, identity: TlsIdentity, host: str, port: int) -> None:
    """Serve until SIGTERM or Ctrl-C (the ``flare relay start`` command)."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):  # before listening: a stop at any time is clean
            loop.add_signal_handler(signum, stop.set)
        relay = Relay(name, identity)
        await relay.start(host, port)
        await stop.wait()
        log.info("Relay %s stopping", name)
        await relay.close()

    log.info("Relay %s starting (pid %d)", name, os.getpid())
    loop = new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()

"""The relay: where sites attach (dialling out), and where the Airflow side asks for a path to them.

A relay holds no federation state and never a key that opens what it carries: it checks
who connects (project certificates), keeps each site's attachment, and for a caller's
path hands out one-time tokens, pairs the two data connections that join with them, and
copies bytes both ways in the kernel (through bounded pipes). Its memory does not grow
with model size. TLS and plain data connections share one port: a connection's first
byte tells them apart. No Airflow here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..provisioning.certs import PeerIdentity
from .listen import open_listeners, peer_address
from .loops import new_event_loop
from .protocol import (
    OPEN_TIMEOUT_S,
    TLS_RECORD_TYPE_HANDSHAKE,
    RelayProtocolError,
    read_message,
    read_message_from,
    send_message,
    write_message,
)
from .splice import BUFFER_LIMIT, SocketSplice, splice
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
    """A path between its token being handed out and both data connections joining."""

    site: str
    caller: asyncio.Future  # the caller's plain socket
    data: asyncio.Future  # the site's end: a plain socket, or (reader, writer) over TLS
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
        self._pending: dict[str, _PendingPath] = {}  # by conn id
        self._tokens: dict[str, tuple[_PendingPath, str]] = {}  # token -> (path, "caller" or "site")
        self._ids = itertools.count(1)
        self._context = identity.context(server_side=True)
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task] = set()
        self._splices: set[SocketSplice] = set()
        self.bytes_relayed = 0
        self.open_paths = 0
        self.site_ends = {"plain": 0, "tls": 0}  # how sites' ends of paths joined, since start

    async def start(self, host: str, port: int) -> int:
        """Listen at ``host`` (``::``: every address, IPv6 and IPv4; see :mod:`.listen`); returns the
        port (useful with port 0)."""
        listeners, where = open_listeners(host, port)
        for listener in listeners:
            self._listeners.append(listener)
            self._spawn(self._accept(listener))
        log.info("Relay %s listening on %s", self.name, where)
        return listeners[0].getsockname()[1]

    async def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        for attachment in list(self.attachments.values()):
            attachment.writer.close()
        for path in list(self._splices):
            path.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as exc:  # out of descriptors, say: keep serving the others
                log.warning("Relay %s: accept failed: %s", self.name, exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._first_byte(sock, peer_address(peer)))

    async def _first_byte(self, sock: socket.socket, address: str) -> None:
        """TLS (a handshake record) or a plain data connection: peek, take nothing."""
        loop = asyncio.get_running_loop()
        try:
            readable = loop.create_future()
            loop.add_reader(sock.fileno(), _settle, readable)
            try:
                await asyncio.wait_for(readable, _HANDSHAKE_TIMEOUT_S)
            finally:
                loop.remove_reader(sock.fileno())
            first = sock.recv(1, socket.MSG_PEEK)
        except (OSError, asyncio.TimeoutError):
            sock.close()
            return
        if first and first[0] == TLS_RECORD_TYPE_HANDSHAKE:
            await self._tls(sock, address)
        elif first:
            await self._join(sock, address)
        else:
            sock.close()

    async def _tls(self, sock: socket.socket, address: str) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=BUFFER_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock, ssl=self._context,
                                                              ssl_handshake_timeout=_HANDSHAKE_TIMEOUT_S)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            log.info("Relay %s: TLS handshake with %s failed: %s", self.name, address, exc or type(exc).__name__)
            sock.close()
            return
        await self._handle(reader, asyncio.StreamWriter(transport, protocol, reader, loop), address)

    # ---- connections ----------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str) -> None:
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
                                             "bytes": self.bytes_relayed, "site_ends": self.site_ends,
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
        site = _name(hello, "site")
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
        site = _name(hello, "site")
        attachment = self.attachments.get(site)
        if attachment is None:
            raise LookupError(f"site {site!r} is not attached to relay {self.name}")
        loop = asyncio.get_running_loop()
        conn = f"{next(self._ids)}-{secrets.token_hex(8)}"
        caller_token, site_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        path = _PendingPath(site, loop.create_future(), loop.create_future())
        self._pending[conn] = path
        self._tokens[caller_token] = (path, "caller")
        self._tokens[site_token] = (path, "site")
        self._spawn(self._carry(conn, path, peer, address, (caller_token, site_token)))
        async with attachment.lock:
            await write_message(attachment.writer, {"op": "open", "conn": conn, "token": site_token})
        await write_message(writer, {"ok": True, "relay": self.name, "token": caller_token})

    async def _carry(self, conn: str, path: _PendingPath, peer: PeerIdentity, address: str, tokens) -> None:
        """Wait for both ends of a path to join, then copy between them until either closes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OPEN_TIMEOUT_S
        caller = site_end = None
        try:
            caller = await asyncio.wait_for(path.caller, OPEN_TIMEOUT_S)
            try:
                site_end = await asyncio.wait_for(path.data, max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await _refuse(caller, f"site {path.site!r} did not open a path within {OPEN_TIMEOUT_S:g}s")
                caller = None
                raise
            await send_message(caller, {"ok": True, "relay": self.name})
        except (asyncio.TimeoutError, OSError) as exc:
            log.info("Relay %s: path %s to %s not completed: %s", self.name, conn, path.site,
                     exc or ("the site did not join" if caller is None and path.caller.done() else "timed out"))
            for end in (caller, site_end, *_settled(path.caller, path.data)):
                _close(end)
            path.done.set()  # a TLS site end waits on it
            return
        finally:
            for token in tokens:
                self._tokens.pop(token, None)
            self._pending.pop(conn, None)
        log.debug("Relay %s: path %s from %s (%s) to %s", self.name, conn, peer.name, address, path.site)
        self.open_paths += 1
        try:
            if isinstance(site_end, socket.socket):
                carried = SocketSplice(caller, site_end, self._tap_for(conn))
                self._splices.add(carried)
                try:
                    self.bytes_relayed += await carried.run()
                finally:
                    self._splices.discard(carried)
            else:  # the site's end is TLS to this relay: asyncio streams on both sides
                caller_reader, caller_writer = await asyncio.open_connection(sock=caller, limit=BUFFER_LIMIT)
                self.bytes_relayed += await splice(caller_reader, caller_writer, *site_end, self._tap_for(conn))
        finally:
            self.open_paths -= 1
            path.done.set()

    async def _join(self, sock: socket.socket, address: str) -> None:
        """A plain data connection: its token says which path and which end it is."""
        try:
            hello = await asyncio.wait_for(read_message_from(sock), _HANDSHAKE_TIMEOUT_S)
            if hello.get("op") != "join":
                raise RelayProtocolError(f"a plain connection may only join a path, not {hello.get('op')!r}")
            path, end = self._tokens.pop(str(hello.get("token")), (None, None))
            if path is None:
                raise LookupError("no path is waiting for this token (unknown, used or expired)")
            if end == "site":
                self.site_ends["plain"] += 1
                await send_message(sock, {"ok": True})
                _settle(path.data, sock)
            else:
                _settle(path.caller, sock)  # answered once the site's end has joined
        except (RelayProtocolError, LookupError) as exc:
            log.warning("Relay %s refused %s: %s", self.name, address, exc)
            await _refuse(sock, str(exc))
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("Relay %s: connection from %s ended: %s", self.name, address, exc or type(exc).__name__)
            sock.close()

    async def _data(self, peer: PeerIdentity, hello: dict, reader, writer) -> None:
        path = self._pending.get(_name(hello, "conn"))
        if path is None or path.data.done():
            raise LookupError(f"no path {hello.get('conn')!r} is waiting")
        if peer.kind != "client" or peer.name != path.site:
            raise PermissionError(f"{peer.kind} {peer.name!r} may not open a path for site {path.site!r}")
        self.site_ends["tls"] += 1
        await write_message(writer, {"ok": True})
        path.data.set_result((reader, writer))
        await path.done.wait()  # the path's carrier copies, then lets this connection go

    def _require_caller(self, peer: PeerIdentity) -> None:
        if peer.kind == "server" or (peer.kind == "admin" and peer.role in ADMIN_ROLES):
            return
        raise PermissionError(f"{peer.kind} {peer.name!r} (role {peer.role!r}) may not open paths to sites")

    def _tap_for(self, conn: str) -> Callable[[bytes], None] | None:
        return None if self.tap is None else (lambda data: self.tap(conn, data))


def _name(hello: dict, field: str) -> str:
    """A site name or path id from a first line: text, or a clear refusal."""
    value = hello.get(field)
    if not isinstance(value, str) or not value:
        raise RelayProtocolError(f"{field!r} must be a non-empty string, got {value!r:.80}")
    return value


def _settle(future: asyncio.Future, value=None) -> None:
    if not future.done():
        future.set_result(value)
    elif isinstance(value, socket.socket):  # a second join for an end already there
        value.close()


def _settled(*futures: asyncio.Future) -> list:
    """What already joined a path that will not be carried; later joins find the futures done and close."""
    ends = []
    for future in futures:
        if future.done() and not future.cancelled():
            ends.append(future.result())
        else:
            future.cancel()
    return ends


def _close(end) -> None:
    if isinstance(end, socket.socket):
        end.close()
    elif end is not None:
        end[1].close()


async def _refuse(sock: socket.socket, reason: str) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(send_message(sock, {"ok": False, "error": reason}), 5)
    sock.close()


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

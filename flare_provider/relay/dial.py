"""Dialling a relay: TCP (through an HTTP CONNECT proxy where a site needs one), TLS, the first message.

Sites and the Airflow side both dial relays; neither ever listens for the other.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

from .protocol import (
    OPEN_TIMEOUT_S,
    RelayProtocolError,
    expect_ok,
    read_message,
    read_message_from,
    recv_until,
    send_message,
    write_message,
)
from .splice import BUFFER_LIMIT
from .tls import peer_identity

CONNECT_TIMEOUT_S = 15.0


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets (``[fd00::1]:8002``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class RelayEndpoint:
    """A relay as kits list it: the server participant it runs as, and where it listens."""

    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "port": self.port}

    @classmethod
    def from_dict(cls, doc: Any) -> "RelayEndpoint":
        """Raises KeyError, TypeError or ValueError (callers name the file or connection)."""
        if not isinstance(doc, dict):
            raise TypeError(f"a relay must be an object with name, host and port, found {type(doc).__name__}")
        name, host, port = doc["name"], doc["host"], doc["port"]
        for key, value in (("name", name), ("host", host)):
            if not isinstance(value, str) or not value or not value.isprintable() or value != value.strip():
                raise ValueError(f"relay {key} must be a non-empty name without spaces or control characters, "
                                 f"found {value!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"relay port must be a whole number from 1 to 65535, found {port!r}")
        return cls(name, host, port)


@dataclass(frozen=True)
class HttpProxy:
    """An HTTP proxy that tunnels with CONNECT, with optional Basic authentication."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> "HttpProxy":
        """``http://[user:password@]host[:port]`` (port 3128 when left out); raises ValueError saying
        what is wrong, with any password in the URL blanked out."""
        shown = _without_password(url)
        try:
            parsed = urlparse(url if "://" in url else f"http://{url}")
        except ValueError as exc:  # e.g. an unclosed [ of an IPv6 address
            raise ValueError(f"proxy {shown!r} is not a URL ({exc}): "
                             f"expected http://[user:password@]host:port") from None
        if parsed.scheme != "http":
            raise ValueError(f"proxy {shown!r}: only http:// proxies are supported (the tunnel inside is TLS "
                             f"already), found {parsed.scheme}://")
        if not parsed.hostname:
            raise ValueError(f"proxy {shown!r} names no host: expected http://[user:password@]host:port")
        if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
            raise ValueError(f"proxy {shown!r}: expected http://[user:password@]host:port, with no path")
        try:
            port = parsed.port
        except ValueError:
            raise ValueError(f"proxy {shown!r}: the port must be a number from 1 to 65535") from None
        if port == 0:
            raise ValueError(f"proxy {shown!r}: the port must be a number from 1 to 65535")
        return cls(parsed.hostname, port or 3128,
                   unquote(parsed.username) if parsed.username else None,
                   unquote(parsed.password) if parsed.password else None)

    def describe(self) -> str:
        return host_port(self.host, self.port)


def _without_password(url: str) -> str:
    """``url`` fit for a message: a password in it replaced by ``***``."""
    scheme, sep, rest = url.rpartition("://")
    credentials, at, place = rest.rpartition("@")
    if at and ":" in credentials:
        rest = f"{credentials.split(':', 1)[0]}:***@{place}"
    return f"{scheme}{sep}{rest}"


async def connect_socket(relay: RelayEndpoint, proxy: HttpProxy | None = None) -> socket.socket:
    """A connected non-blocking TCP socket to ``relay``, through ``proxy``'s CONNECT tunnel if given."""
    loop = asyncio.get_running_loop()
    host, port = (proxy.host, proxy.port) if proxy else (relay.host, relay.port)
    errors = []
    for family, kind, proto, _, address in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            break
        except OSError as exc:
            sock.close()
            errors.append(exc)
    else:
        raise errors[0] if errors else ConnectionError(f"{host}:{port} has no address")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small messages (pings, gRPC frames) go at once
    if proxy is not None:
        try:
            await _connect_through(sock, proxy, relay)
        except BaseException:
            sock.close()
            raise
    return sock


async def _connect_through(sock: socket.socket, proxy: HttpProxy, relay: RelayEndpoint) -> None:
    request = [f"CONNECT {relay.address} HTTP/1.1", f"Host: {relay.address}"]
    if proxy.username is not None:
        token = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode()).decode()
        request.append(f"Proxy-Authorization: Basic {token}")
    await asyncio.get_running_loop().sock_sendall(sock, ("\r\n".join(request) + "\r\n\r\n").encode())
    try:
        head = await recv_until(sock, b"\r\n\r\n", limit=16384)
    except RelayProtocolError:
        raise ConnectionError(f"proxy {proxy.describe()} answered CONNECT with an oversized header") from None
    if not head.endswith(b"\r\n\r\n"):
        raise ConnectionError(f"proxy {proxy.describe()} closed the connection during CONNECT")
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    if status.split(" ")[1:2] != ["200"]:
        raise ConnectionError(f"proxy {proxy.describe()} refused CONNECT {relay.address}: {status}")


async def dial_relay(
    relay: RelayEndpoint,
    context: ssl.SSLContext,
    hello: dict[str, Any],
    proxy: HttpProxy | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
    """A TLS connection to ``relay`` that said yes to ``hello``: (reader, writer, its reply).

    The relay must prove it is ``relay.name`` of the project (its certificate, checked by
    ``context``); a refusal raises :class:`RelayProtocolError` with the relay's reason.
    """

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = await connect_socket(relay, proxy)
        try:
            return await asyncio.open_connection(sock=sock, ssl=context, server_hostname=relay.name,
                                                 limit=BUFFER_LIMIT)
        except BaseException:
            sock.close()
            raise

    reader, writer = await asyncio.wait_for(connect(), CONNECT_TIMEOUT_S)
    try:
        relay_peer = peer_identity(writer.get_extra_info("ssl_object"))
        if relay_peer.kind != "server":
            raise RelayProtocolError(f"{relay.address} presented a {relay_peer.kind} certificate, not a relay's")
        await write_message(writer, hello)
        reply = expect_ok(await asyncio.wait_for(read_message(reader), CONNECT_TIMEOUT_S), f"relay {relay.name}")
    except BaseException:
        writer.close()
        raise
    return reader, writer, reply


async def join_path(relay: RelayEndpoint, token: str, proxy: HttpProxy | None = None) -> socket.socket:
    """A path's plain data connection to ``relay``, once the relay says it is joined (see protocol)."""
    sock = await asyncio.wait_for(connect_socket(relay, proxy), CONNECT_TIMEOUT_S)
    try:
        await send_message(sock, {"op": "join", "token": token})
        # The caller's answer comes once the site's end has joined: allow for the site's dial.
        reply = await asyncio.wait_for(read_message_from(sock), OPEN_TIMEOUT_S + CONNECT_TIMEOUT_S)
        expect_ok(reply, f"relay {relay.name}")
    except BaseException:
        sock.close()
        raise
    return sock

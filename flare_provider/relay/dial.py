"""Dialling a relay: TCP (through an HTTP CONNECT proxy where a site needs one), TLS, the first message.

Sites and the Airflow side both dial relays; neither ever listens for the other.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

from .protocol import RelayProtocolError, expect_ok, read_message, write_message
from .splice import BUFFER_LIMIT
from .tls import peer_identity

CONNECT_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class RelayEndpoint:
    """A relay as kits list it: the server participant it runs as, and where it listens."""

    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "port": self.port}

    @classmethod
    def from_dict(cls, doc: Any) -> "RelayEndpoint":
        """Raises KeyError, TypeError or ValueError (callers name the file or connection)."""
        return cls(str(doc["name"]), str(doc["host"]), int(doc["port"]))


@dataclass(frozen=True)
class HttpProxy:
    """An HTTP proxy that tunnels with CONNECT, with optional Basic authentication."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> "HttpProxy":
        parsed = urlparse(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "") or not parsed.hostname:
            raise ValueError(f"proxy {url!r}: expected http://[user:password@]host:port")
        return cls(parsed.hostname, parsed.port or 3128,
                   unquote(parsed.username) if parsed.username else None,
                   unquote(parsed.password) if parsed.password else None)

    @classmethod
    def from_environment(cls, host: str) -> "HttpProxy | None":
        """``https_proxy`` / ``HTTPS_PROXY`` unless ``no_proxy`` names ``host``."""
        url = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")
        skip = os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or ""
        if not url or any(host == p.strip() or (p.strip().startswith(".") and host.endswith(p.strip()))
                          for p in skip.split(",") if p.strip()):
            return None
        return cls.from_url(url)

    def describe(self) -> str:
        return f"{self.host}:{self.port}"


async def _through_proxy(proxy: HttpProxy, relay: RelayEndpoint) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port, limit=BUFFER_LIMIT)
    request = [f"CONNECT {relay.address} HTTP/1.1", f"Host: {relay.address}"]
    if proxy.username is not None:
        token = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode()).decode()
        request.append(f"Proxy-Authorization: Basic {token}")
    writer.write(("\r\n".join(request) + "\r\n\r\n").encode())
    await writer.drain()
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.close()
        raise ConnectionError(f"proxy {proxy.describe()} closed the connection during CONNECT") from None
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    if status.split(" ")[1:2] != ["200"]:
        writer.close()
        raise ConnectionError(f"proxy {proxy.describe()} refused CONNECT {relay.address}: {status}")
    return reader, writer


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
        if proxy is None:
            return await asyncio.open_connection(relay.host, relay.port, ssl=context, server_hostname=relay.name,
                                                 limit=BUFFER_LIMIT)
        reader, writer = await _through_proxy(proxy, relay)
        await writer.start_tls(context, server_hostname=relay.name)
        return reader, writer

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

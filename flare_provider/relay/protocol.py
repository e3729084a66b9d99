"""What relays, sites and callers say to each other before the bytes start flowing.

Every connection to a relay is TLS with a project certificate on both ends. Its first
line (JSON, at most :data:`MAX_LINE` bytes) says what the connection is for:

- ``{"op": "attach", "site": S}`` from site S: its control connection. The relay answers
  ``{"ok": true}``, then sends ``{"op": "open", "conn": ID, "token": T}`` whenever a caller
  wants a path to S, and ``{"op": "pong"}`` to each ``{"op": "ping"}`` the site sends to
  keep the attachment (and every NAT and load balancer on the way) alive.
- ``{"op": "open", "site": S}`` from a server or admin identity: a path to S. The relay
  answers ``{"ok": true, "token": T}``.
- ``{"op": "status"}`` from a server or admin identity: the attached sites.
- ``{"op": "data", "conn": ID}`` from site S: the site's end of path ID over TLS, for a
  site whose proxy lets nothing but TLS through (``relay_data: tls``).

A path's data connections are plain TCP to the same port, each opened with one line,
``{"op": "join", "token": T}``, using a token the relay handed out over an authenticated
TLS connection (single use, valid for :data:`OPEN_TIMEOUT_S`). Once the relay answers
``{"ok": true}`` (to the caller: when the site's end has joined too), the connection
carries the caller's own mutual-TLS session with the agent, which the relay passes on
byte for byte and cannot open. Encrypting that ciphertext once more on each hop would
protect nothing and cost most of a relayed transfer's time, so the hops do not.

A refusal is ``{"ok": false, "error": "..."}`` and the relay closes the connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

DEFAULT_RELAY_PORT = 8002  # NVIDIA FLARE's fed_learn_port
MAX_LINE = 4096
PING_INTERVAL_S = 20.0  # load balancers and NAT cut idle connections after minutes; ping well within
PING_TIMEOUT_S = 15.0  # no pong this long after a ping: the attachment is dead
OPEN_TIMEOUT_S = 15.0  # how long a relay waits for a path's data connections
TLS_RECORD_TYPE_HANDSHAKE = 0x16  # a TLS connection's first byte; a plain one starts with "{"


class RelayProtocolError(ConnectionError):
    """A peer said something that is not this protocol, or refused."""


def encode(doc: dict[str, Any]) -> bytes:
    line = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise RelayProtocolError(f"message too long ({len(line)} bytes)")
    return line


def decode(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise RelayProtocolError(f"message longer than {MAX_LINE} bytes")
    if not line.endswith(b"\n"):
        raise RelayProtocolError("connection closed" if not line else f"message longer than {MAX_LINE} bytes or cut short")
    try:
        doc = json.loads(line)
    except ValueError as exc:
        raise RelayProtocolError(f"not a protocol message: {exc}") from None
    if not isinstance(doc, dict):
        raise RelayProtocolError("not a protocol message: not a JSON object")
    return doc


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        line = exc.partial
    except (asyncio.LimitOverrunError, ValueError):
        raise RelayProtocolError(f"message longer than {MAX_LINE} bytes") from None
    return decode(line)


async def write_message(writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
    writer.write(encode(doc))
    await writer.drain()


def expect_ok(reply: dict[str, Any], what: str) -> dict[str, Any]:
    if reply.get("ok") is not True:
        raise RelayProtocolError(f"{what}: {reply.get('error') or 'refused'}")
    return reply


async def recv_until(sock: socket.socket, end: bytes, limit: int = MAX_LINE) -> bytes:
    """Bytes from a non-blocking socket up to and including ``end``, never one more.

    One byte per read: what follows the line belongs to the TLS session behind it, and
    the lines are short.
    """
    loop = asyncio.get_running_loop()
    data = bytearray()
    while not data.endswith(end):
        if len(data) >= limit:
            raise RelayProtocolError(f"message longer than {limit} bytes")
        byte = await loop.sock_recv(sock, 1)
        if not byte:
            break
        data += byte
    return bytes(data)


async def read_message_from(sock: socket.socket) -> dict[str, Any]:
    return decode(await recv_until(sock, b"\n"))


async def send_message(sock: socket.socket, doc: dict[str, Any]) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, encode(doc))

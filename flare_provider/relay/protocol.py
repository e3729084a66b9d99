"""What relays, sites and callers say to each other before the bytes start flowing.

Every connection to a relay is TLS with a project certificate on both ends. Its first
line (JSON, at most :data:`MAX_LINE` bytes) says what the connection is for:

- ``{"op": "attach", "site": S}`` from site S: its control connection. The relay answers
  ``{"ok": true}``, then sends ``{"op": "open", "conn": ID}`` whenever a caller wants a
  path to S, and ``{"op": "pong"}`` to each ``{"op": "ping"}`` the site sends to keep the
  attachment (and every NAT and load balancer on the way) alive.
- ``{"op": "data", "conn": ID}`` from site S: the site's end of path ID.
- ``{"op": "open", "site": S}`` from a server or admin identity: a path to S. Once the
  relay answers ``{"ok": true}``, the connection carries the caller's own TLS session with
  the agent, which the relay passes on byte for byte and cannot open.
- ``{"op": "status"}`` from a server or admin identity: the attached sites.

A refusal is ``{"ok": false, "error": "..."}`` and the relay closes the connection.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

DEFAULT_RELAY_PORT = 8002  # NVIDIA FLARE's fed_learn_port
MAX_LINE = 4096
PING_INTERVAL_S = 20.0  # load balancers and NAT cut idle connections after minutes; ping well within
PING_TIMEOUT_S = 15.0  # no pong this long after a ping: the attachment is dead
OPEN_TIMEOUT_S = 15.0  # how long a relay waits for a site's data connection


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

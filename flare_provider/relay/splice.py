"""Copying bytes both ways between two connections, through bounded buffers.

Used by the relay (caller <-> site), the site's connector (relay <-> the local agent) and
the Airflow side's tunnel (gRPC <-> relay), all asyncio: one event loop per process side,
never two threads on one TLS connection. What flows is the end-to-end TLS session
between the Airflow side and the agent; nothing here looks inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

CHUNK = 1 << 20  # per read
# Read-buffer limit of every relayed connection: with asyncio's write-buffer limits it
# bounds the memory a path holds, whatever the size of what flows through it.
BUFFER_LIMIT = 4 << 20


async def splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    tap: Callable[[bytes], None] | None = None,
) -> int:
    """Copy a -> b and b -> a until either side closes; then close both. Returns the bytes copied."""
    copied = 0

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal copied
        while data := await reader.read(CHUNK):
            if tap is not None:
                tap(data)
            writer.write(data)
            copied += len(data)
            await writer.drain()  # waits while the other side is slower: the buffer stays bounded

    for writer in (a_writer, b_writer):  # fewer, larger writes between the processes on the path
        writer.transport.set_write_buffer_limits(high=BUFFER_LIMIT)
    pumps = [asyncio.create_task(pump(a_reader, b_writer)), asyncio.create_task(pump(b_reader, a_writer))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in pumps:
            task.cancel()
        for task in pumps:
            with contextlib.suppress(BaseException):
                await task
        for writer in (a_writer, b_writer):
            writer.close()
    return copied


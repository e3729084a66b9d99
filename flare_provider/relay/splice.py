"""Copying bytes both ways between two connections, through bounded buffers.

Used by the relay (caller <-> site), the site's connector (relay <-> the local agent) and
the Airflow side's tunnel (gRPC <-> relay). What flows is the end-to-end TLS session
between the Airflow side and the agent; nothing here looks inside it. Plain data
connections are copied by the kernel (:func:`splice_sockets`); a connection that is TLS
to the relay (a site that asks for it, ``relay_data: tls``) is copied through asyncio
streams (:func:`splice`), never with two threads on one TLS connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import threading
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



# ---- plain sockets, copied by the kernel ------------------------------------------------
# Data connections carry only the end-to-end TLS session, so nothing on the path needs to
# see their bytes: each direction moves socket -> pipe -> socket with os.splice, in a
# thread of its own (the calls block and release the GIL), never through Python buffers.

_F_SETPIPE_SZ = 1031  # fcntl: a 1 MiB pipe takes a whole chunk per call (Linux's default limit)


def _pump(source: socket.socket, target: socket.socket, tap: Callable[[bytes], None] | None) -> int:
    moved = 0
    if tap is None and hasattr(os, "splice"):
        pipe_out, pipe_in = os.pipe()
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe_in, _F_SETPIPE_SZ, CHUNK)
            while count := os.splice(source.fileno(), pipe_in, CHUNK):
                while count:
                    sent = os.splice(pipe_out, target.fileno(), count)
                    count -= sent
                    moved += sent
        finally:
            os.close(pipe_in)
            os.close(pipe_out)
        return moved
    buffer = memoryview(bytearray(CHUNK))  # no splice here, or a test records the bytes
    while received := source.recv_into(buffer):
        if tap is not None:
            tap(bytes(buffer[:received]))
        target.sendall(buffer[:received])
        moved += received
    return moved


class SocketSplice:
    """Both directions between two connected sockets, until either side ends; then both close."""

    def __init__(self, a: socket.socket, b: socket.socket, tap: Callable[[bytes], None] | None = None):
        self.sockets = (a, b)
        self.tap = tap
        self.copied = 0
        self._lock = threading.Lock()
        self._running = 2
        self._done: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> int:
        """Copy until either side closes (or this is cancelled); returns the bytes copied."""
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        a, b = self.sockets
        for sock in self.sockets:
            sock.setblocking(True)
        for source, target in ((a, b), (b, a)):
            threading.Thread(target=self._direction, args=(source, target), name="flare-splice", daemon=True).start()
        try:
            await asyncio.shield(self._done)
        finally:
            self.cut()  # cancelled (a relay closing): unblock both threads; they close the sockets
        return self.copied

    def cut(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _direction(self, source: socket.socket, target: socket.socket) -> None:
        moved = 0
        try:
            moved = _pump(source, target, self.tap)
        except OSError:
            pass  # a reset or a cut: the path is over either way
        finally:
            self.cut()  # the other direction's blocking call returns
            with self._lock:
                self.copied += moved
                self._running -= 1
                last = self._running == 0
            if last:
                for sock in self.sockets:
                    sock.close()
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                    self._loop.call_soon_threadsafe(_settle, self._done)


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


async def splice_sockets(a: socket.socket, b: socket.socket, tap: Callable[[bytes], None] | None = None) -> int:
    """Copy a -> b and b -> a in the kernel until either side closes; then close both. Returns the bytes copied."""
    return await SocketSplice(a, b, tap).run()

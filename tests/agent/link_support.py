"""A TCP link between a client and an agent that a test can cut, slow down or stall.

It stands where a relay will stand: it only splices bytes (the mutual TLS runs through
it, end to end), and it can be told to drop every connection after N more bytes went
one way, as a relay killed mid-transfer does, to stay down for a while, to forward at a
given rate, or to hold everything back.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

PIECE = 64 << 10


class Link:
    """Forwards 127.0.0.1:<port> to a target port; ``address`` is where clients connect."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.forwarded = {"up": 0, "down": 0}  # bytes, client to agent and back
        self.cuts = 0
        self.rate: float | None = None  # bytes per second each way; None: as fast as it goes
        self.down = threading.Event()  # refusing connections
        self.stalled = threading.Event()  # holding every byte back
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._cut_at: dict[str, int] = {}
        self._stay_down = False
        self._stall_instead = False
        self._on_cut: Callable[[], None] | None = None
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, nbytes: int, direction: str = "up", stay_down: bool = False,
                  on_cut: Callable[[], None] | None = None) -> None:
        """Drop every connection once ``nbytes`` more went ``direction``.

        ``stay_down`` refuses new connections until :meth:`restore`; ``on_cut`` runs first.
        """
        with self._lock:
            self._cut_at = {direction: self.forwarded[direction] + nbytes}
            self._stay_down = stay_down
            self._on_cut = on_cut
            self._stall_instead = False

    def stall_after(self, nbytes: int, direction: str = "up") -> None:
        """Hold every byte back, both ways, once ``nbytes`` more went ``direction`` (until :meth:`restore`)."""
        with self._lock:
            self._cut_at = {direction: self.forwarded[direction] + nbytes}
            self._stay_down, self._on_cut, self._stall_instead = False, None, True

    def restore(self) -> None:
        self.down.clear()
        self.stalled.clear()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._drop_all()

    # ---- splicing -----------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        try:
            while True:
                data = source.recv(PIECE)
                if not data:
                    break
                while self.stalled.is_set() and not self._closed:
                    time.sleep(0.05)
                sink.sendall(data)
                if self.rate:
                    time.sleep(len(data) / self.rate)
                self._count(direction, len(data))
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _count(self, direction: str, nbytes: int) -> None:
        with self._lock:
            self.forwarded[direction] += nbytes
            limit = self._cut_at.get(direction)
            if limit is None or self.forwarded[direction] < limit:
                return
            self._cut_at = {}
            if self._stall_instead:
                self.stalled.set()
                return
            self.cuts += 1
            if self._stay_down:
                self.down.set()
            on_cut = self._on_cut
        if on_cut is not None:
            on_cut()
        self._drop_all()

    def _drop_all(self) -> None:
        """Every connection ends at once, as when the process splicing them dies."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

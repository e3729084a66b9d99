"""Fixtures for the rounds libraries: a real moto S3 server, buckets, update files.

The S3 server is ``moto_server`` from the virtualenv, run as a child process on a free
127.0.0.1 port and reached over HTTP with boto3, exactly as a deployment reaches S3.
"""

from __future__ import annotations

import select
import socket
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from s3_server import MotoServer  # tests/ is on sys.path
from safetensors.numpy import save_file


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target port until stopped; stopping cuts every connection.

    Stands between a client and the S3 server so a test can make the endpoint vanish at
    an exact moment while the server (and what it stored) lives on.
    """

    def __init__(self, target_port: int, port: int = 0):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._stopped.is_set():
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stopped.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """One moto S3 server for the session."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_client(moto):
    return moto.client()


@pytest.fixture
def bucket(s3_client) -> str:
    """A fresh, empty bucket for one test."""
    name = f"flare-test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def update_file(tmp_path):
    """Writes a site's update file as a trainer does: ``update_file(name, tensors, metadata=None)``."""
    folder = tmp_path / "updates"
    folder.mkdir()

    def write(name: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
        path = folder / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        return path

    return write


@pytest.fixture
def start_moto(tmp_path):
    """Starts a dedicated moto server (for tests that kill it); all are stopped at the end."""
    servers: list[MotoServer] = []

    def start() -> MotoServer:
        servers.append(MotoServer(tmp_path))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def tcp_proxy():
    """``tcp_proxy(target_port, port=0)``: a proxy to 127.0.0.1:target_port that a test can cut;
    all are stopped at the end."""
    proxies: list[TcpProxy] = []

    def start(target_port: int, port: int = 0) -> TcpProxy:
        proxies.append(TcpProxy(target_port, port))
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.stop()

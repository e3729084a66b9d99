"""The limits the figures are judged against, measured on this machine in the same run.

``python -m bench.limits tcp-sink`` and ``python -m bench.limits grpc-sink --kit SITE_KIT``
are the receiving ends of the loopback measurements: child processes, so that sender
and receiver do not share one interpreter lock, as the engine and an agent do not.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import GIB, REPO, median

CHUNK = 1 << 20  # the payload chunk size of the wire format (flare_provider.wire.chunks)
SINK_START_TIMEOUT = 60.0
SINK_SERVICE = "flare.bench.Sink"


# ---- gRPC ---------------------------------------------------------------------------------


def status_round_trips(kit, sites: list[str], calls: int = 30) -> dict[str, float]:
    """Median seconds of one ``GetStatus`` call per site, on a connected channel (as the engine holds)."""
    result = {}
    for site in sites:
        with kit.client(site) as client:
            for _ in range(3):  # connect and warm up
                client.status()
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                client.status()
                times.append(time.perf_counter() - started)
        result[site] = median(times)
    return result


def grpc_mtls_stream(fed, site: str, nbytes: int, repeats: int = 3) -> float:
    """Bytes/s of one gRPC client stream of raw 1 MiB messages over mutual TLS on loopback.

    The receiver is a bare gRPC server with the site's certificate in a child process;
    the sender uses the server identity and the channel settings of ``AgentClient``:
    what the transport carries when nothing else (hashing, disk, protobuf framing of
    the payload messages) is done.
    """
    import grpc

    from flare_provider.client import load_caller_kit
    from flare_provider.client.channel import channel_credentials, channel_options

    kit = load_caller_kit(fed.server_kit)
    with _Sink([sys.executable, "-m", "bench.limits", "grpc-sink", "--kit", str(fed.kits[site])]) as port:
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}", channel_credentials(kit.cert_pem, kit.key_pem, kit.root_ca_pem), options=channel_options(site)
        )
        try:
            push = channel.stream_unary(f"/{SINK_SERVICE}/Push")  # no serializers: raw bytes
            block = os.urandom(CHUNK)
            count = max(1, nbytes // CHUNK)
            push(iter([block] * 4), timeout=60)  # handshake and warm-up
            rates = []
            for _ in range(repeats):
                started = time.perf_counter()
                received = int.from_bytes(push(iter([block] * count), timeout=600), "big")
                rates.append(received / (time.perf_counter() - started))
                if received != count * CHUNK:
                    raise RuntimeError(f"the gRPC sink received {received} bytes of {count * CHUNK}")
        finally:
            channel.close()
    return median(rates)


def _serve_grpc_sink(kit_dir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from flare_provider.wire.chunks import MAX_MESSAGE_BYTES
    from site_agent.kit_config import load_agent_config

    config = load_agent_config(kit_dir)

    def push(chunks, context):
        return sum(len(chunk) for chunk in chunks).to_bytes(8, "big")

    server = grpc.server(
        ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SINK_SERVICE, {"Push": grpc.stream_unary_rpc_method_handler(push)})]
    )
    credentials = grpc.ssl_server_credentials(
        [(config.key_file.read_bytes(), config.cert_file.read_bytes())],
        root_certificates=config.root_ca_file.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    print(port, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(0)


# ---- plain TCP, cipher, memory, disk ------------------------------------------------------


def tcp_loopback(nbytes: int, repeats: int = 3) -> float:
    """Bytes/s of one TCP connection on 127.0.0.1, sender here, receiver in a child process."""
    block = os.urandom(CHUNK)
    count = max(1, nbytes // CHUNK)
    rates = []
    with _Sink([sys.executable, "-m", "bench.limits", "tcp-sink"]) as port:
        for _ in range(repeats):
            with socket.create_connection(("127.0.0.1", port), timeout=600) as conn:
                started = time.perf_counter()
                for _ in range(count):
                    conn.sendall(block)
                conn.shutdown(socket.SHUT_WR)
                received = int.from_bytes(_recv_exactly(conn, 8), "big")
                rates.append(received / (time.perf_counter() - started))
    return median(rates)


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            raise RuntimeError("the TCP sink closed the connection early")
        data += more
    return data


def _serve_tcp_sink() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        buffer = bytearray(CHUNK)
        while True:
            ready, _, _ = select.select([listener, sys.stdin], [], [])
            if sys.stdin in ready:  # the parent closed our stdin: done
                return
            conn, _ = listener.accept()
            with conn:
                total = 0
                while n := conn.recv_into(buffer):
                    total += n
                conn.sendall(total.to_bytes(8, "big"))


def aes_gcm(nbytes: int, repeats: int = 3) -> float:
    """Bytes/s of AES-128-GCM encryption (TLS 1.3's usual cipher) in 1 MiB pieces on one core."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    cipher = AESGCM(AESGCM.generate_key(bit_length=128))
    block = os.urandom(CHUNK)
    count = max(1, nbytes // CHUNK)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(count):
            cipher.encrypt(i.to_bytes(12, "big"), block, None)
        rates.append(count * CHUNK / (time.perf_counter() - started))
    return median(rates)


def sha256(nbytes: int, repeats: int = 3) -> float:
    """Bytes/s of SHA-256 (bundles', snapshots' and older peers' checksum) in 1 MiB pieces on one core."""
    import hashlib

    return _hash_rate(hashlib.sha256, nbytes, repeats)


def xxh3(nbytes: int, repeats: int = 3) -> float:
    """Bytes/s of XXH3-128 (the checksum of weights and results in transit) in 1 MiB pieces on one core."""
    import xxhash

    return _hash_rate(xxhash.xxh3_128, nbytes, repeats)


def _hash_rate(new_hash, nbytes: int, repeats: int) -> float:
    block = os.urandom(CHUNK)
    count = max(1, nbytes // CHUNK)
    rates = []
    for _ in range(repeats):
        digest = new_hash()
        started = time.perf_counter()
        for _ in range(count):
            digest.update(block)
        rates.append(count * CHUNK / (time.perf_counter() - started))
    return median(rates)


def memory_copy(nbytes: int = GIB, repeats: int = 5) -> float:
    """Bytes/s of numpy copying one large array into another (both already in memory)."""
    source = np.ones(nbytes // 8, np.float64)
    target = np.empty_like(source)
    np.copyto(target, source)  # touch every page first
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        rates.append(source.nbytes / (time.perf_counter() - started))
    return median(rates)


def disk_write(folder: Path, nbytes: int, repeats: int = 3) -> float:
    """Bytes/s of writing a file in 1 MiB pieces and fsync-ing it, as a received payload is written."""
    block = os.urandom(CHUNK)
    count = max(1, nbytes // CHUNK)
    path = Path(folder) / "disk-write.bin"
    rates = []
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            with open(path, "wb") as f:
                for _ in range(count):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
            rates.append(count * CHUNK / (time.perf_counter() - started))
            path.unlink()
    finally:
        path.unlink(missing_ok=True)
    return median(rates)


# ---- process start-up ---------------------------------------------------------------------

STARTUP_STEPS = {
    "the interpreter alone (`python -c pass`)": "pass",
    "+ what `site_agent.worker` imports (numpy, safetensors, yaml, the app loader)": "import site_agent.worker.task_runner",
    "+ PyTorch (what the built-in trainer imports)": "import site_agent.worker.task_runner, torch",
}


def process_startup(runs: int = 10) -> dict[str, float]:
    """Median wall seconds of a fresh Python process doing each of :data:`STARTUP_STEPS`,
    with the worker's environment (no bytecode writing, the repository on the path).
    The steps take turns, so that load from elsewhere falls on all of them alike."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO)}
    times: dict[str, list[float]] = {label: [] for label in STARTUP_STEPS}
    for _ in range(runs):
        for label, code in STARTUP_STEPS.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
            times[label].append(time.perf_counter() - started)
    return {label: median(values) for label, values in times.items()}


_FORK_PROBE = """
import os, statistics, sys, time
import site_agent.worker.task_runner, torch  # what the launcher has imported (site.yaml preload_modules: [torch])
times = []
for _ in range(int(sys.argv[1])):
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    times.append(time.perf_counter() - started)
print(statistics.median(times))
"""


def fork_of_warm_worker(runs: int = 20) -> float:
    """Median seconds to fork (and reap) a process that has imported the worker and PyTorch:
    what the worker launcher (``site_agent.runtime.launcher``) pays to start a task."""
    out = subprocess.run(
        [sys.executable, "-c", _FORK_PROBE, str(runs)], env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, check=True, timeout=120,
    )
    return float(out.stdout.strip())


# ---- the receiving ends -------------------------------------------------------------------


class _Sink:
    """A receiver child process that prints its port, then serves until its stdin closes."""

    def __init__(self, command: list[str]):
        self.command = command
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> int:
        self.proc = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, text=True,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], SINK_START_TIMEOUT)
        line = self.proc.stdout.readline().strip() if ready else ""
        if not line.isdigit():
            self.__exit__()
            raise RuntimeError(f"{' '.join(self.command[2:])} did not start (it printed {line!r})")
        return int(line)

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description="receivers of the loopback limits")
    parser.add_argument("sink", choices=("tcp-sink", "grpc-sink"))
    parser.add_argument("--kit", type=Path, help="the site kit whose certificate the gRPC sink presents")
    args = parser.parse_args(argv)
    if args.sink == "tcp-sink":
        _serve_tcp_sink()
    else:
        if args.kit is None:
            parser.error("grpc-sink needs --kit")
        _serve_grpc_sink(args.kit)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers for the reliability tests (imported by name; conftest modules cannot be).

What a fault needs that the project does not ship: a hostile peer holding a site's real
certificate, certificates re-issued with another validity, a proxy that takes the S3
endpoint down at an exact request, DAG files for the operator, and a look at what the
agents started (from their logs) and whether those processes still live.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from rounds.conftest import TcpProxy  # tests/ is on sys.path

from flare_provider.client import load_caller_kit
from flare_provider.provisioning.certs import Identity
from flare_provider.wire import agent_pb2, agent_pb2_grpc
from flare_provider.wire.bundles import build_bundle
from flare_provider.wire.chunks import MAX_MESSAGE_BYTES, read_header, receive_payload, send_payload
from flare_provider.wire.payload_codec import add_agent_servicer
from flare_provider.wire.tensors import load_file

REPO = Path(__file__).resolve().parents[2]
DIGITS_APP = REPO / "examples" / "apps" / "digits"
NUM_SITES = 9
LIVE_SITES = ("site-1", "site-2")  # their agents run (see conftest.py)
# Provisioned, agents never started: where a test puts an unreachable site, a hostile peer
# or an expired certificate.
SPARE_SITES = tuple(f"site-{i}" for i in range(3, NUM_SITES + 1))


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def deploy(fed, app_dir: Path, sites) -> str:
    """Deploy ``app_dir``, signed by the server identity, to ``sites``; returns its version."""
    kit = load_caller_kit(fed.server_kit)
    bundle = build_bundle(app_dir, kit.cert_pem, kit.key_pem)
    versions = set()
    for site in sites:
        with kit.client(site) as client:
            versions.add(client.deploy_app(bundle)[0].version)
    (version,) = versions
    return version


# ---- DAG files for the operator ----------------------------------------------------------

_DAG_FILE = """\
import pendulum
from airflow.sdk import DAG
from flare_provider.operators import ScatterGatherOperator

with DAG({dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False,
         default_args={{"retries": {retries}, "retry_delay": pendulum.duration(seconds=1)}}) as dag:
{tasks}
"""


def dag_file(dag_id: str, tasks: Mapping[str, Mapping[str, Any]], retries: int = 0) -> str:
    """The source of a DAG with one ``ScatterGatherOperator`` per entry of ``tasks``
    (task id -> the operator's arguments, written with ``repr``)."""
    lines = []
    for task_id, arguments in tasks.items():
        args = "".join(f", {name}={value!r}" for name, value in arguments.items())
        lines.append(f"    ScatterGatherOperator(task_id={task_id!r}{args})")
    return _DAG_FILE.format(dag_id=dag_id, retries=retries, tasks="\n".join(lines))


def task_instance(dag_run, task_id: str):
    (ti,) = [ti for ti in dag_run.get_task_instances() if ti.task_id == task_id]
    return ti


# ---- what the agents did -----------------------------------------------------------------

_STARTED = re.compile(r"task (\S+) running in process (\d+)")


class AgentLogs:
    """The tasks each agent started after this mark was taken (read from the agents' logs)."""

    def __init__(self, fed, sites):
        self.fed = fed
        self.offsets = {site: self._size(site) for site in sites}

    def _size(self, site: str) -> int:
        path = self.fed.agent(site).log_path
        return path.stat().st_size if path.exists() else 0

    def text(self, site: str) -> str:
        with open(self.fed.agent(site).log_path, "rb") as f:
            f.seek(self.offsets[site])
            return f.read().decode(errors="replace")

    def started(self, site: str) -> dict[str, list[int]]:
        """Task id -> the worker process ids the agent started for it since the mark."""
        tasks: dict[str, list[int]] = {}
        for task_id, pid in _STARTED.findall(self.text(site)):
            tasks.setdefault(task_id, []).append(int(pid))
        return tasks


def process_group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` (a task's worker and its children) still runs."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- certificates --------------------------------------------------------------------------


def root_identity(fed) -> Identity:
    """The project's root CA, from the provisioning workspace's ``state/``."""
    state = fed.root / "workspace" / fed.name / "state"
    return Identity.from_pem((state / "rootCA.pem").read_bytes(), (state / "rootCA.key").read_bytes())


def kit_identity(fed, participant: str) -> Identity:
    startup = fed.kits[participant] / "startup"
    cert, key = (startup / f"{participant}.crt").read_bytes(), (startup / f"{participant}.key").read_bytes()
    return Identity.from_pem(cert, key)


def reissue(identity: Identity, root: Identity, not_before: dt.datetime, not_after: dt.datetime) -> Identity:
    """``identity``'s certificate (subject, key, extensions) issued again by ``root`` with
    another validity; everything but the dates is what provisioning wrote."""
    cert = x509.CertificateBuilder(
        issuer_name=root.cert.subject,
        subject_name=identity.cert.subject,
        public_key=identity.key.public_key(),
        serial_number=x509.random_serial_number(),
        not_valid_before=not_before,
        not_valid_after=not_after,
        extensions=list(identity.cert.extensions),
    ).sign(root.key, hashes.SHA256())
    return Identity(cert, identity.key)


def validity(days_from: float, days_to: float) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    return now + dt.timedelta(days=days_from), now + dt.timedelta(days=days_to)


# ---- a hostile peer ------------------------------------------------------------------------


class HostileSite(agent_pb2_grpc.FlareAgentServicer):
    """The ``FlareAgent`` service as a compromised or broken site plays it.

    It accepts every task at once, reports it succeeded with ``num_samples`` samples and
    serves ``craft(global_weights)`` as the result through the real chunked protocol, so
    the only thing wrong is what the server receives. ``calls`` records every call that
    got past the TLS handshake.
    """

    def __init__(
        self, site: str, craft: Callable[[dict[str, np.ndarray]], bytes], scratch: Path, num_samples: int = 10**6
    ):
        self.site = site
        self.craft = craft
        self.scratch = scratch
        self.num_samples = num_samples
        self.calls: list[str] = []
        self._tasks: dict[str, tuple[agent_pb2.TaskState, bytes]] = {}
        self._lock = threading.Lock()

    def _task(self, task_id: str, context) -> tuple[agent_pb2.TaskState, bytes]:
        with self._lock:
            if task_id not in self._tasks:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no task {task_id!r}")
            return self._tasks[task_id]

    def GetStatus(self, request, context):
        self.calls.append("GetStatus")
        return agent_pb2.AgentStatus(site=self.site, version="hostile")

    def SubmitTask(self, request_iterator, context):
        self.calls.append("SubmitTask")
        messages = iter(request_iterator)
        header = read_header(messages, "task submission")
        with self._lock:
            known = self._tasks.get(header.task_id)
        if known is not None:
            return agent_pb2.SubmitTaskReply(state=known[0], created=False)
        path = receive_payload(messages, header.payload_size, self.scratch, 1 << 30, "global weights")
        try:
            result = self.craft(load_file(path))
        finally:
            path.unlink()
        now = time.time()
        state = agent_pb2.TaskState(
            task_id=header.task_id, app_name=header.app_name, app_version="hostile", round=header.round,
            kind=header.kind or "train", status="succeeded", progress=1.0, metrics={"accuracy": 1.0},
            num_samples=self.num_samples, result_available=True, seq=1, created_at=now, started_at=now, finished_at=now,
        )
        with self._lock:
            self._tasks[header.task_id] = (state, result)
        return agent_pb2.SubmitTaskReply(state=state, created=True)

    def GetTask(self, request, context):
        self.calls.append("GetTask")
        return self._task(request.task_id, context)[0]

    def WatchTask(self, request, context):
        self.calls.append("WatchTask")
        state = self._task(request.task_id, context)[0]
        if state.seq > request.after_seq:
            yield state

    def FetchResult(self, request, context):
        self.calls.append("FetchResult")
        state, result = self._task(request.task_id, context)
        yield from send_payload(agent_pb2.FetchResultReply, agent_pb2.FetchResultHeader(state=state), result)

    def AcknowledgeResult(self, request, context):
        self.calls.append("AcknowledgeResult")
        self._task(request.task_id, context)
        return agent_pb2.AcknowledgeResultReply()

    def AbortTask(self, request, context):
        self.calls.append("AbortTask")
        return self._task(request.task_id, context)[0]


@contextmanager
def serve_as_site(
    fed, site: str, servicer: agent_pb2_grpc.FlareAgentServicer, identity: Identity | None = None
) -> Iterator:
    """Serve ``servicer`` where ``site``'s agent is expected, with mutual TLS as an agent
    does: ``identity`` (default: the site's own certificate and key from its kit) and
    only callers whose certificate the project's root CA issued."""
    identity = identity or kit_identity(fed, site)
    root_ca = (fed.kits[site] / "startup" / "rootCA.pem").read_bytes()
    server = grpc.server(
        ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"hostile-{site}"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),  # a port still taken must fail here, not be shared
        ],
    )
    add_agent_servicer(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(identity.key_pem, identity.cert_pem)], root_certificates=root_ca, require_client_auth=True
    )
    address = f"127.0.0.1:{fed.ports[site]}"
    if not server.add_secure_port(address, credentials):
        raise RuntimeError(f"cannot listen on {address}")
    server.start()
    try:
        yield servicer
    finally:
        server.stop(grace=None).wait(10)


# ---- the S3 endpoint going down ----------------------------------------------------------


class CuttingProxy(TcpProxy):
    """A :class:`TcpProxy` that goes down the moment a request matching ``trigger`` passes.

    That request never reaches the server, every open connection is cut and new ones are
    refused, as when the endpoint's machine dies; a new proxy on the same port brings the
    endpoint back, with everything the server stored before.
    """

    def __init__(self, target_port: int, trigger: re.Pattern[bytes]):
        self.trigger = trigger
        self.cut_at: float | None = None  # time.monotonic() of the cut
        super().__init__(target_port)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:  # a: the client's side
        peers = {a: b, b: a}
        try:
            while not self._stopped.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    if sock is a and self.trigger.search(data):
                        self.cut_at = time.monotonic()
                        self.stop()
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()

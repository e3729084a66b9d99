"""Calling a site agent over mutual TLS: the Airflow side's (and an admin's) client.

:class:`AgentClient` is synchronous (operators, the ``flare`` CLI);
:class:`AsyncAgentClient` (grpc.aio) serves Airflow triggers. Both are built from PEM
material (the caller's certificate and key, the project's root CA), the site's name and
the address its agent is reached at. The agent's certificate is checked against the
site's name whatever the address, so a site is always talking to itself, not to
whoever answers at that address. Every call has a timeout, and every failure is an
:class:`AgentError` naming the site and the gRPC status code.

Imports neither Airflow nor PyTorch.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from .provisioning.kits import ADMIN_CONFIG, SERVER_CONFIG, STARTUP
from .wire import agent_pb2, agent_pb2_grpc
from .wire.chunks import (
    DEFAULT_CHUNK_SIZE,
    MAX_MESSAGE_BYTES,
    PayloadError,
    PayloadTooLarge,
    read_header,
    receive_payload,
    send_payload,
)

DEFAULT_TIMEOUT = 30.0  # seconds for a short call (status, get, acknowledge, abort)
DEFAULT_TRANSFER_TIMEOUT = 3600.0  # seconds for an upload or a download of weights
DEFAULT_MAX_RESULT_BYTES = 8 << 30
RECONNECT_BACKOFF_MS = 3_000  # longest wait between attempts to reach a site that was down
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "aborted"})


class AgentError(Exception):
    """A call to a site's agent failed; ``code`` is the gRPC status code."""

    def __init__(self, site: str, method: str, code: grpc.StatusCode, details: str):
        self.site = site
        self.method = method
        self.code = code
        self.details = details
        super().__init__(f"site {site!r}: {method} failed: {code.name}: {details}")


# ---- what calls return ---------------------------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    """A task's state on a site (the agent's ``TaskState``)."""

    task_id: str
    app_name: str
    app_version: str
    round: int
    kind: str
    status: str  # queued, running, succeeded, failed, aborted
    progress: float
    metrics: dict[str, float]
    error: str | None
    gpus: list[int]
    num_samples: int
    result_available: bool
    seq: int
    created_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for XCom and trigger events."""
        return asdict(self)

    @classmethod
    def from_message(cls, m: agent_pb2.TaskState) -> "TaskInfo":
        return cls(
            task_id=m.task_id,
            app_name=m.app_name,
            app_version=m.app_version,
            round=m.round,
            kind=m.kind,
            status=m.status,
            progress=m.progress,
            metrics=dict(m.metrics),
            error=m.error if m.HasField("error") else None,
            gpus=list(m.gpus),
            num_samples=m.num_samples,
            result_available=m.result_available,
            seq=m.seq,
            created_at=m.created_at,
            started_at=m.started_at if m.HasField("started_at") else None,
            finished_at=m.finished_at if m.HasField("finished_at") else None,
        )


@dataclass(frozen=True)
class AppVersion:
    name: str
    version: str
    has_custom_code: bool
    deployed_at: float

    @classmethod
    def from_message(cls, m: agent_pb2.AppInfo) -> "AppVersion":
        return cls(m.name, m.version, m.has_custom_code, m.deployed_at)


@dataclass(frozen=True)
class AgentStatus:
    project: str
    site: str
    org: str
    version: str
    gpus: list[int]
    allow_custom_code: bool
    apps: list[AppVersion]
    active_tasks: list[TaskInfo]
    task_counts: dict[str, int]
    started_at: float
    caller: dict[str, str]  # how the agent identified us: name, org, kind, role

    @classmethod
    def from_message(cls, m: agent_pb2.AgentStatus) -> "AgentStatus":
        return cls(
            project=m.project,
            site=m.site,
            org=m.org,
            version=m.version,
            gpus=list(m.gpus),
            allow_custom_code=m.allow_custom_code,
            apps=[AppVersion.from_message(a) for a in m.apps],
            active_tasks=[TaskInfo.from_message(t) for t in m.active_tasks],
            task_counts=dict(m.task_counts),
            started_at=m.started_at,
            caller={"name": m.caller.name, "org": m.caller.org, "kind": m.caller.kind, "role": m.caller.role},
        )


# ---- identities and kits -------------------------------------------------------------


@dataclass(frozen=True)
class SiteEndpoint:
    """Where a site's agent is reached, as provisioning recorded it."""

    name: str
    host: str
    port: int
    org: str = ""
    gpus: tuple[int, ...] = ()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class CallerKit:
    """A server or admin kit: the identity that calls the agents, and the sites it knows."""

    project: str
    name: str
    kind: str  # "server" or "admin"
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    root_ca_pem: bytes = field(repr=False)
    sites: dict[str, SiteEndpoint] = field(default_factory=dict)

    def client(self, site: str, address: str | None = None, **kwargs: Any) -> "AgentClient":
        """A client for ``site``, at ``address`` or where the kit says it is."""
        return AgentClient(site, address or self.endpoint(site).address, self.cert_pem, self.key_pem, self.root_ca_pem, **kwargs)

    def async_client(self, site: str, address: str | None = None, **kwargs: Any) -> "AsyncAgentClient":
        return AsyncAgentClient(site, address or self.endpoint(site).address, self.cert_pem, self.key_pem, self.root_ca_pem, **kwargs)

    def site_statuses(self, timeout: float = 5.0, sites: list[str] | None = None) -> dict[str, "AgentStatus | AgentError"]:
        """Every site's status, or the error reaching it gave; asked all at once, never raising."""

        def probe(site: str) -> AgentStatus | AgentError:
            with self.client(site, timeout=timeout) as client:
                try:
                    return client.status()
                except AgentError as exc:
                    return exc

        names = list(self.sites) if sites is None else sites
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(names)))) as pool:
            return dict(zip(names, pool.map(probe, names), strict=True))

    def endpoint(self, site: str) -> SiteEndpoint:
        try:
            return self.sites[site]
        except KeyError:
            raise KeyError(f"site {site!r} is not in the {self.kind} kit of {self.name!r} (sites: {sorted(self.sites)})") from None


class KitError(ValueError):
    """A folder that is not a usable server or admin kit."""


# The config file of each kind of caller kit; it names its holder under the kind ("server": ...).
_CALLER_CONFIGS = {"server": SERVER_CONFIG, "admin": ADMIN_CONFIG}


def load_caller_kit(kit_dir: str | os.PathLike) -> CallerKit:
    """Read a server kit (``startup/server.json``) or an admin kit (``startup/admin.json``)."""
    for kind, config_name in _CALLER_CONFIGS.items():
        config_path = Path(kit_dir) / STARTUP / config_name
        if config_path.is_file():
            return _read_caller_kit(config_path, kind)
    raise KitError(f"{kit_dir}: neither startup/{SERVER_CONFIG} nor startup/{ADMIN_CONFIG} found; pass a server or admin kit")


def _read_caller_kit(config_path: Path, kind: str) -> CallerKit:
    startup = config_path.parent
    try:
        doc = json.loads(config_path.read_text(encoding="utf-8"))
        sites = {
            name: SiteEndpoint(name, s["host"], int(s["port"]), s.get("org", ""), tuple(s.get("gpus", ())))
            for name, s in doc.get("sites", {}).items()
        }
        return CallerKit(
            project=doc["project"],
            name=doc[kind],
            kind=kind,
            cert_pem=(startup / doc["cert"]).read_bytes(),
            key_pem=(startup / doc["key"]).read_bytes(),
            root_ca_pem=(startup / doc["root_ca"]).read_bytes(),
            sites=sites,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KitError(f"{config_path}: unusable ({type(exc).__name__}: {exc})") from None


# ---- the clients ---------------------------------------------------------------------


def _channel_options(site: str) -> list[tuple[str, Any]]:
    return [
        # The agent must prove it is `site`, whatever host name or address reached it.
        ("grpc.ssl_target_name_override", site),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Long watches and transfers survive idle firewalls; the agent permits this rate.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Calls fail fast while a site is down; once it is back, a client reconnects within
        # seconds (gRPC's default backoff grows to two minutes).
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
    ]


def _credentials(cert_pem: bytes, key_pem: bytes, root_ca_pem: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=root_ca_pem, private_key=key_pem, certificate_chain=cert_pem)


class AgentClient:
    """A synchronous client of one site's agent. Use as a context manager, or call close()."""

    def __init__(
        self,
        site: str,
        address: str,
        cert_pem: bytes,
        key_pem: bytes,
        root_ca_pem: bytes,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transfer_timeout: float = DEFAULT_TRANSFER_TIMEOUT,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        self.site = site
        self.address = address
        self.timeout = timeout
        self.transfer_timeout = transfer_timeout
        self.chunk_size = chunk_size
        self._channel = grpc.secure_channel(
            address, _credentials(cert_pem, key_pem, root_ca_pem), options=_channel_options(site)
        )
        self._stub = agent_pb2_grpc.FlareAgentStub(self._channel)

    @classmethod
    def from_kit(cls, kit_dir: str | os.PathLike, site: str, address: str | None = None, **kwargs: Any) -> "AgentClient":
        """A client with the identity of a server or admin kit, for one of its sites."""
        return load_caller_kit(kit_dir).client(site, address, **kwargs)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AgentClient(site={self.site!r}, address={self.address!r})"

    @contextmanager
    def _call(self, method: str):
        try:
            yield
        except grpc.RpcError as exc:
            raise AgentError(self.site, method, exc.code(), exc.details() or "") from None
        except PayloadError as exc:  # what arrived is not what the agent sent
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, PayloadTooLarge) else grpc.StatusCode.DATA_LOSS
            raise AgentError(self.site, method, code, str(exc)) from None

    # ---- calls ---------------------------------------------------------------------

    def status(self, timeout: float | None = None) -> AgentStatus:
        with self._call("GetStatus"):
            reply = self._stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=timeout or self.timeout)
        return AgentStatus.from_message(reply)

    def deploy_app(self, bundle: bytes | str | os.PathLike) -> tuple[AppVersion, bool]:
        """Upload a signed app bundle (bytes or a file); returns (app, newly_deployed)."""
        with self._call("DeployApp"):
            messages = send_payload(agent_pb2.DeployAppRequest, agent_pb2.DeployAppHeader(), bundle, self.chunk_size)
            reply = self._stub.DeployApp(messages, timeout=self.transfer_timeout)
        return AppVersion.from_message(reply.app), reply.newly_deployed

    def submit_task(
        self,
        task_id: str,
        app_name: str,
        weights: bytes | str | os.PathLike,
        round: int,
        *,
        kind: str = "train",
        config: dict[str, Any] | None = None,
        app_version: str | None = None,
        num_gpus: int | None = None,
    ) -> tuple[TaskInfo, bool]:
        """Start a task with the global ``weights`` (safetensors bytes or file).

        Idempotent by ``task_id``: a task the site knows is returned as it is, without
        uploading the weights again. Returns (task, created).
        """
        header = agent_pb2.SubmitTaskHeader(
            task_id=task_id, app_name=app_name, round=round, kind=kind, config_json=json.dumps(config or {})
        )
        if app_version is not None:
            header.app_version = app_version
        if num_gpus is not None:
            header.num_gpus = num_gpus
        with self._call("SubmitTask"):
            messages = send_payload(agent_pb2.SubmitTaskRequest, header, weights, self.chunk_size)
            reply = self._stub.SubmitTask(messages, timeout=self.transfer_timeout)
        return TaskInfo.from_message(reply.state), reply.created

    def get_task(self, task_id: str) -> TaskInfo:
        with self._call("GetTask"):
            return TaskInfo.from_message(self._stub.GetTask(agent_pb2.TaskRef(task_id=task_id), timeout=self.timeout))

    def watch_task(self, task_id: str, timeout: float, after_seq: int = 0) -> Iterator[TaskInfo]:
        """The task's state now and after every change, until it ends or ``timeout`` passes.

        Running out of time ends the iteration quietly; look at the last state seen.
        """
        call = self._stub.WatchTask(agent_pb2.WatchTaskRequest(task_id=task_id, after_seq=after_seq), timeout=timeout)
        try:
            with self._call("WatchTask"):
                try:
                    for message in call:
                        yield TaskInfo.from_message(message)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise
        finally:
            call.cancel()  # the caller may stop early; free the stream on the agent at once

    def fetch_result(
        self, task_id: str, dest: str | os.PathLike, max_bytes: int = DEFAULT_MAX_RESULT_BYTES
    ) -> TaskInfo:
        """Download a finished task's result (safetensors) to ``dest``; returns the task's state.

        ``dest`` appears only once the whole file arrived with the right size and
        SHA-256. Its metadata says whether it holds full weights or a difference
        (:data:`flare_provider.wire.tensors.RESULT_KIND_KEY`); ``num_samples`` and the
        metrics are in the returned state. The agent keeps its copy until :meth:`acknowledge`.
        """
        dest = Path(dest)
        with self._call("FetchResult"):
            replies = self._stub.FetchResult(agent_pb2.TaskRef(task_id=task_id), timeout=self.transfer_timeout)
            header = read_header(replies, f"result of task {task_id}")
            tmp = receive_payload(replies, header.payload_size, dest.parent, max_bytes, f"result of task {task_id}")
        os.replace(tmp, dest)
        return TaskInfo.from_message(header.state)

    def acknowledge(self, task_id: str) -> None:
        """Tell the site its result is safe here; it deletes its copy."""
        with self._call("AcknowledgeResult"):
            self._stub.AcknowledgeResult(agent_pb2.TaskRef(task_id=task_id), timeout=self.timeout)

    def abort(self, task_id: str) -> TaskInfo:
        with self._call("AbortTask"):
            return TaskInfo.from_message(self._stub.AbortTask(agent_pb2.TaskRef(task_id=task_id), timeout=self.timeout))

    def shutdown(self, reason: str = "") -> None:
        """Stop the agent (project_admin only)."""
        with self._call("Shutdown"):
            self._stub.Shutdown(agent_pb2.ShutdownRequest(reason=reason), timeout=self.timeout)


class AsyncAgentClient:
    """An asyncio client of one site's agent (grpc.aio), for Airflow triggers.

    The channel opens on first use, inside the running event loop.
    """

    def __init__(
        self,
        site: str,
        address: str,
        cert_pem: bytes,
        key_pem: bytes,
        root_ca_pem: bytes,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self.site = site
        self.address = address
        self.timeout = timeout
        self._credentials = _credentials(cert_pem, key_pem, root_ca_pem)
        self._channel: grpc.aio.Channel | None = None
        self._stub: agent_pb2_grpc.FlareAgentStub | None = None

    @classmethod
    def from_kit(cls, kit_dir: str | os.PathLike, site: str, address: str | None = None, **kwargs: Any) -> "AsyncAgentClient":
        return load_caller_kit(kit_dir).async_client(site, address, **kwargs)

    def _agent(self) -> agent_pb2_grpc.FlareAgentStub:
        if self._stub is None:
            self._channel = grpc.aio.secure_channel(self.address, self._credentials, options=_channel_options(self.site))
            self._stub = agent_pb2_grpc.FlareAgentStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> "AsyncAgentClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _error(self, method: str, exc: grpc.aio.AioRpcError) -> AgentError:
        return AgentError(self.site, method, exc.code(), exc.details() or "")

    async def _unary(self, method: str, request, timeout: float | None = None):
        try:
            return await getattr(self._agent(), method)(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(method, exc) from None

    async def status(self, timeout: float | None = None) -> AgentStatus:
        return AgentStatus.from_message(await self._unary("GetStatus", agent_pb2.GetStatusRequest(), timeout))

    async def get_task(self, task_id: str) -> TaskInfo:
        return TaskInfo.from_message(await self._unary("GetTask", agent_pb2.TaskRef(task_id=task_id)))

    async def abort(self, task_id: str) -> TaskInfo:
        return TaskInfo.from_message(await self._unary("AbortTask", agent_pb2.TaskRef(task_id=task_id)))

    async def watch_task(self, task_id: str, timeout: float, after_seq: int = 0) -> AsyncIterator[TaskInfo]:
        """Like :meth:`AgentClient.watch_task`: states until the task ends or ``timeout`` passes."""
        call = self._agent().WatchTask(agent_pb2.WatchTaskRequest(task_id=task_id, after_seq=after_seq), timeout=timeout)
        try:
            async for message in call:
                yield TaskInfo.from_message(message)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise self._error("WatchTask", exc) from None
        finally:
            call.cancel()

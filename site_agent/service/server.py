"""The site agent's gRPC server: the kit verified, the runtime started, the service served over mutual TLS.

:class:`SiteAgent` is what ``flare-agent start`` runs: it checks the kit's signature
before reading anything from it, holds the work folder against a second agent, listens
(mutual TLS, client certificates of the project's root CA only) and serves
:class:`~site_agent.service.agent_service.AgentService` over the app store and the task
manager until it is asked to stop.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from flare_provider.provisioning.kits import STARTUP
from flare_provider.provisioning.signature import require_valid
from flare_provider.relay.tls import TlsIdentity
from flare_provider.wire.chunks import MAX_MESSAGE_BYTES, PARTIAL_PREFIX
from flare_provider.wire.payload_codec import add_agent_servicer

from ..kit_config import ConfigError, load_agent_config
from ..relay_proxies import relay_proxies, route
from ..runtime.app_store import APPS_DIR, AppStore
from ..runtime.task_manager import TaskManager
from ..site_settings import load_site_settings
from .agent_service import AgentService, Limits
from .audit import AUDIT_FILE, AuditLog
from .outbound import OutboundConnector

log = logging.getLogger(__name__)

LOCK_FILE = "agent.lock"
SOCKET_RECORD = "agent.socket"  # in the work folder: where a dialling-out agent serves (health checks read it)


class SiteAgent:
    """One site's agent: the verified kit, the runtime and the gRPC server over it.

    ``start()`` listens and returns the bound port; ``wait()`` blocks until
    :meth:`request_stop` (a Shutdown call, a signal); ``stop()`` ends the server and
    the running tasks cleanly.
    """

    def __init__(
        self,
        kit_dir: str | Path,
        host: str | None = None,
        port: int | None = None,
        root_fingerprint: str | None = None,
        limits: Limits = Limits(),
        max_workers: int = 64,
    ):
        kit_dir = Path(kit_dir).resolve()
        # Nothing from the kit is used before its signature checks out.
        require_valid(kit_dir / STARTUP, root_fingerprint)
        self.config = load_agent_config(kit_dir)
        self.settings = load_site_settings(kit_dir)
        self.root_ca_pem = self.config.root_ca_file.read_bytes()
        self.host = host or self.config.listen_host
        self.port = self.config.port if port is None else port
        self.limits = limits
        self.max_workers = max_workers
        self._stop_requested = threading.Event()
        self._stop_reason = ""
        self._server: grpc.Server | None = None
        self._lock_fd = -1
        self.service: AgentService | None = None
        self.connector: OutboundConnector | None = None
        self._socket_dir: str | None = None
        self.connect = self.settings.connect or ("outbound" if self.config.relays else "listen")
        if self.connect == "outbound" and not self.config.relays:
            raise ConfigError(f"site {self.config.site}: site.yaml says connect: outbound, but the kit lists no relays")
        # Each relay on its own: no_proxy may send one through the proxy and another directly.
        # A bad proxy URL or no_proxy entry stops the agent here, before it takes the work folder.
        self.proxies = (relay_proxies(self.config.relays, self.settings.proxy, self.settings.no_proxy, os.environ)
                        if self.connect == "outbound" else {})

    def start(self) -> int:
        """Claim the work folder, listen, start the runtime; returns the port listened on."""
        work = self.settings.work_dir
        self._lock_fd = _lock_work_dir(work)
        try:
            server, port = self._listen()
            apps = AppStore(work / APPS_DIR, self.root_ca_pem, self.config.servers, self.limits.max_bundle_bytes)
            tasks = TaskManager(self.settings, apps, self.config.site)
            for leftover in tasks.incoming_dir.glob(f"{PARTIAL_PREFIX}*"):  # uploads cut short by a crash
                leftover.unlink(missing_ok=True)
            tasks.start()
        except BaseException:
            os.close(self._lock_fd)
            raise
        audit = AuditLog(work / AUDIT_FILE)
        attachments = (lambda: list(self.connector.states.values())) if self.connector else (lambda: ())
        self.service = AgentService(self.config, self.settings, apps, tasks, audit, self.limits, self.request_stop,
                                    attachments)
        add_agent_servicer(self.service, server)
        server.start()
        self._server = server
        if self.connector is not None:
            self.connector.start()
            routes = [f"{r.name} ({r.address}, {route(self.proxies.get(r.name))})" for r in self.config.relays]
            log.info("agent of site %s (project %s) dials out to relays %s; mutual TLS end to end, no port open",
                     self.config.site, self.config.project, ", ".join(routes))
        else:
            log.info(
                "agent of site %s (project %s) listening on %s:%d with mutual TLS",
                self.config.site, self.config.project, self.host, port,
            )
        return port

    def _listen(self) -> tuple[grpc.Server, int]:
        """A server bound to the address (not yet serving): a taken port fails before any task is touched."""
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="rpc"),
            # Each call holds a thread (a watch for as long as it lasts); one call too many is
            # refused at once with RESOURCE_EXHAUSTED rather than left waiting for a thread.
            maximum_concurrent_rpcs=self.max_workers,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),  # a second agent on the same port must fail, not share it
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients keep long watches alive
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        credentials = grpc.ssl_server_credentials(
            [(self.config.key_file.read_bytes(), self.config.cert_file.read_bytes())],
            root_certificates=self.root_ca_pem,
            require_client_auth=True,
        )
        address = self._address()
        try:
            port = server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0
        if not port:
            raise OSError(f"cannot listen on {address}: the address is in use or not available here")
        return server, port

    def _address(self) -> str:
        """Where the gRPC server listens: the kit's host and port, or, dialling out, a Unix
        socket in a private folder that only the connector (this process) joins paths to."""
        if self.connect == "listen":
            return f"{self.host}:{self.port}"
        self._socket_dir = tempfile.mkdtemp(prefix="flare-agent-")  # short: Unix socket paths are limited
        socket_path = os.path.join(self._socket_dir, "agent.sock")
        (self.settings.work_dir / SOCKET_RECORD).write_text(socket_path + "\n")
        identity = TlsIdentity(self.config.cert_file.read_bytes(), self.config.key_file.read_bytes(), self.root_ca_pem)
        self.connector = OutboundConnector(
            self.config.site,
            self.config.relays,
            identity,
            socket_path,
            proxies=self.proxies,
            relay_data=self.settings.relay_data,
        )
        return f"unix:{socket_path}"

    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason
        self._stop_requested.set()

    def wait(self) -> str:
        """Block until a stop is requested; returns the reason."""
        while not self._stop_requested.wait(timeout=1.0):  # a timeout keeps signals deliverable
            pass
        return self._stop_reason

    def stop(self, grace: float = 5.0) -> None:
        """Stop listening, let calls in flight finish for ``grace`` seconds, stop the tasks."""
        if self._server is None or self.service is None:
            return
        self.service.stopping.set()
        if self.connector is not None:
            self.connector.stop()
        self._server.stop(grace).wait()
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        self.service.tasks.close()
        self.service.audit.close()
        os.close(self._lock_fd)
        self._server = None
        log.info("agent of site %s stopped", self.config.site)


def _lock_work_dir(work: Path) -> int:
    """Hold the work folder for this process's life (the lock ends with the process, even
    on SIGKILL). Two agents on one folder would each take the other's running tasks for
    ones cut short by a crash."""
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(f"{work} is in use by another agent of this site; stop that one first") from None
    return fd

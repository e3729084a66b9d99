"""A local proof-of-concept federation: every participant on this machine, on loopback.

What ``nvflare poc`` is to NVIDIA FLARE: provision a project on 127.0.0.1, optionally give
each site a non-IID share of the example digits data, and run the relays and agents as
child processes (still mutual TLS, still signed kits). With ``connect="outbound"`` (the
production topology) the sites dial out to the relays and listen on no port; with
``"listen"`` each agent serves on a loopback port. The demo, the tests and the benchmarks
use it; nothing here is needed for a real deployment.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..client import AgentClient, AgentError, load_caller_kit
from ..provisioning import load_project, provision
from ..provisioning.kits import CONNECTIONS_FILE, LOCAL, SITE_SETTINGS, STARTUP, connection_id
from .processes import ProcessError, Service, tail, wait_for

SERVER = "airflow-server"
ADMIN = "admin@poc.local"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def free_port(preferred: int | None = None) -> int:
    """A port free on 127.0.0.1: ``preferred`` when it is free, else one below the kernel's
    ephemeral range.

    A port the kernel hands out itself (bind to 0) lies in the range it also gives outgoing
    connections: between the moment it is chosen here and the moment an agent or relay
    binds it, any connection on the machine may take it (with dozens of sites starting, one
    did). Below that range only a listener can, and a listener is seen when binding here.
    """
    with socket.socket() as s:
        candidates = ([preferred] if preferred else []) + random.sample(range(_LISTEN_PORTS_FROM, _ephemeral_start()), 64)
        for port in candidates:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LISTEN_PORTS_FROM = 20000


def _ephemeral_start() -> int:
    """The first port of the kernel's range for outgoing connections (32768 where unknown)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low, _LISTEN_PORTS_FROM + 1024)


@dataclass
class LocalFederation:
    """A provisioned local project: kits, ports and where the data went."""

    name: str
    root: Path
    kits: dict[str, Path]
    ports: dict[str, int]
    sites: tuple[str, ...]
    root_fingerprint: str
    server: str = SERVER
    admin: str = ADMIN
    connect: str = "listen"
    relay_ports: dict[str, int] = field(default_factory=dict)  # server participant -> its relay's port
    agents: dict[str, "AgentProcess"] = field(default_factory=dict, repr=False)
    relays: dict[str, Service] = field(default_factory=dict, repr=False)

    @property
    def server_kit(self) -> Path:
        return self.kits[self.server]

    @property
    def admin_kit(self) -> Path:
        return self.kits[self.admin]

    @property
    def connections_file(self) -> Path:
        return self.server_kit / STARTUP / CONNECTIONS_FILE

    @property
    def conn_id(self) -> str:
        return connection_id(self.name)

    def data_dir(self, site: str) -> Path:
        return self.kits[site] / "data"

    def set_site_settings(self, site: str, **changes: object) -> None:
        """Change a site's own settings (``local/site.yaml``, outside the signed part of its kit)."""
        import yaml

        path = self.kits[site] / LOCAL / SITE_SETTINGS
        settings = yaml.safe_load(path.read_text())
        settings.update(changes)
        path.write_text(yaml.safe_dump(settings, sort_keys=False))

    def connection_json(self) -> str:
        """The server identity as Airflow's JSON connection format (``AIRFLOW_CONN_<ID>``)."""
        (fields,) = json.loads(self.connections_file.read_text()).values()
        return json.dumps({**fields, "extra": json.loads(fields["extra"])})

    def client(self, site: str, **kwargs) -> AgentClient:
        """A client of ``site`` with the server identity."""
        return load_caller_kit(self.server_kit).client(site, **kwargs)

    def deploy_app(self, app_dir: str | os.PathLike) -> str:
        """Sign ``app_dir`` with the server identity and deploy it to every site; its version."""
        from ..wire.bundles import build_bundle

        kit = load_caller_kit(self.server_kit)
        bundle = build_bundle(Path(app_dir), kit.cert_pem, kit.key_pem)
        versions = set()
        for site in self.sites:
            with kit.client(site) as client:
                versions.add(client.deploy_app(bundle)[0].version)
        (version,) = versions
        return version

    def agent(self, site: str) -> "AgentProcess":
        if site not in self.agents:
            self.agents[site] = AgentProcess(self.kits[site], site, self.ports[site], self.server_kit)
        return self.agents[site]

    def relay(self, server: str | None = None) -> Service:
        """The relay process of server participant ``server`` (default: the first)."""
        server = server or self.server
        if server not in self.relays:
            argv = [sys.executable, "-m", "flare_provider.cli", "relay", "start", "--kit", str(self.kits[server]),
                    "--host", "127.0.0.1"]
            port = self.relay_ports[server]
            self.relays[server] = Service(f"relay-{server}", argv, dict(os.environ), self.root,
                                          ready=lambda _: _accepts(port))
        return self.relays[server]

    def start_relays(self) -> None:
        for server in self.relay_ports:
            if not self.relay(server).alive:
                self.relay(server).start()
        for server in self.relay_ports:
            self.relay(server).wait_ready(START_TIMEOUT)

    def start_agents(self, sites: list[str] | None = None) -> None:
        if self.connect == "outbound":
            self.start_relays()
        for site in sites or self.sites:
            self.agent(site).start(wait=False)
        for site in sites or self.sites:
            self.agent(site).wait_ready()

    def stop_agents(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        for relay in self.relays.values():
            relay.stop()


def prepare(
    root: str | Path,
    name: str = "poc",
    num_sites: int = 3,
    *,
    digits_data: bool = True,
    non_iid: bool = True,
    seed: int = 0,
    connect: str = "listen",
    num_relays: int = 1,
    admins: Mapping[str, tuple[str, str]] | None = None,
) -> LocalFederation:
    """Provision ``name`` with ``num_sites`` loopback sites under ``root``; with
    ``digits_data``, write each site's share of the digits data to its kit's ``data/``.

    ``connect="outbound"`` makes the sites dial out to ``num_relays`` relays (one per
    server participant: ``airflow-server``, ``airflow-server-2``, ...). ``admins`` maps
    admin names to (org, role); default: :data:`ADMIN`, a ``project_admin`` of org
    ``lead``. Site ``site-N`` is of org ``org-site-N``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sites = tuple(f"site-{i}" for i in range(1, num_sites + 1))
    ports = {site: free_port() for site in sites}
    servers = [SERVER, *(f"{SERVER}-{i}" for i in range(2, num_relays + 1))]
    relay_ports = {server: free_port() for server in servers}
    lines = ["api_version: 3", f"name: {name}", "description: local proof-of-concept federation", "participants:"]
    lines += [f"  - {{name: {server}, type: server, org: lead, host_names: [127.0.0.1], fed_learn_port: {port}}}"
              for server, port in relay_ports.items()]
    lines += [f"  - {{name: {s}, type: client, org: org-{s}, agent_host: 127.0.0.1, agent_port: {ports[s]}, connect: {connect}}}"
              for s in sites]
    for admin, (org, role) in (admins or {ADMIN: ("lead", "project_admin")}).items():
        lines.append(f"  - {{name: '{admin}', type: admin, org: {org}, role: {role}}}")
    project_file = root / "project.yml"
    project_file.write_text("\n".join(lines) + "\n")
    result = provision(load_project(project_file), root / "workspace")
    federation = LocalFederation(name, root, dict(result.kits), ports, sites, result.root_fingerprint,
                                 connect=connect, relay_ports=relay_ports)
    if digits_data:
        from site_agent.datasets.digits import write_site_partitions

        write_site_partitions([federation.data_dir(s) for s in sites], non_iid=non_iid, seed=seed)
    return federation


def _accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


class AgentProcess:
    """A ``flare-agent start`` child process serving one site's kit on loopback."""

    def __init__(self, kit: Path, site: str, port: int, caller_kit: Path, extra_args: tuple[str, ...] = ()):
        self.kit = Path(kit)
        self.site = site
        self.port = port
        self.caller_kit = caller_kit
        self.extra_args = extra_args
        self.log_path = self.kit / "agent.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "site_agent.cli", "start", "--kit", str(self.kit),
                "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True) -> "AgentProcess":
        env = {**os.environ, "GRPC_VERBOSITY": os.environ.get("GRPC_VERBOSITY", "ERROR")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        with load_caller_kit(self.caller_kit).client(self.site, timeout=2.0) as client:
            def answers() -> bool:
                if self.proc is None or self.proc.poll() is not None:
                    code = self.proc and self.proc.returncode
                    raise ProcessError(f"agent of {self.site} exited with {code}:\n{self.log_tail()}")
                try:
                    client.status()
                    return True
                except AgentError:
                    return False

            wait_for(f"agent of {self.site} answering", answers, timeout, details=self.log_tail)

    def stop(self) -> int:
        """SIGTERM, then wait for the clean shutdown."""
        if not self.alive:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: the agent dies without any clean-up."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

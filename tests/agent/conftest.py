"""Shared fixtures for the site agent's tests: real provisioned kits, real agents.

A federation is provisioned into a temporary workspace with its sites on free loopback
ports. Agents run as real ``flare-agent start`` child processes (the same entry point
as the console script) serving mutual TLS; :class:`AgentProcess` stops them with
SIGTERM, kills them with SIGKILL and starts them again. Every wait is bounded.

Test modules reach everything through fixtures (``federation``, ``agent``,
``make_agent``, ``wait_until``), since conftest modules are not imported by name.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import runtime_support

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # keep the handshake failures we provoke out of the output

from flare_provider import poc
from flare_provider.client import AgentClient, load_caller_kit
from flare_provider.provisioning import load_project, provision
from flare_provider.wire.bundles import build_bundle
from site_agent.runtime.processes import worker_processes
from site_agent.runtime.task_manager import TaskManager
from site_agent.service.audit import AUDIT_FILE, read_audit_log

SERVER = "fl-server"
SITES = {"site-1": "org_a", "site-2": "org_b"}
ADMINS = {  # name: (org, role)
    "boss@lead": ("lead_org", "project_admin"),
    "it@org_a": ("org_a", "org_admin"),
    "chief@org_b": ("org_b", "lead"),
    "viewer@org_a": ("org_a", "member"),
}
EXAMPLE_APPS = Path(__file__).resolve().parents[2] / "examples" / "apps"
START_TIMEOUT = poc.START_TIMEOUT  # seconds for an agent to answer after it was started
STOP_TIMEOUT = poc.STOP_TIMEOUT


free_port = poc.free_port


def project_yaml(name: str, ports: dict[str, int]) -> str:
    lines = [
        "api_version: 3",
        f"name: {name}",
        "participants:",
        f"  - {{name: {SERVER}, type: server, org: lead_org}}",
    ]
    for site, org in SITES.items():
        lines.append(f"  - {{name: {site}, type: client, org: {org}, agent_host: 127.0.0.1, agent_port: {ports[site]}, connect: listen}}")
    for admin, (org, role) in ADMINS.items():
        lines.append(f"  - {{name: '{admin}', type: admin, org: {org}, role: {role}}}")
    return "\n".join(lines) + "\n"


@dataclass
class Federation:
    """A provisioned project: its workspace, kit folders and the sites' ports."""

    name: str
    workspace: Path
    kits: dict[str, Path]
    ports: dict[str, int]
    server: str = SERVER
    sites: tuple[str, ...] = tuple(SITES)

    @property
    def server_kit(self) -> Path:
        return self.kits[SERVER]

    @property
    def state_dir(self) -> Path:
        return self.workspace / self.name / "state"

    def address(self, site: str) -> str:
        return f"127.0.0.1:{self.ports[site]}"

    def pem(self, participant: str, name: str) -> bytes:
        """A PEM file of a participant's kit: ``crt``, ``key`` or ``rootCA``."""
        file = "rootCA.pem" if name == "rootCA" else f"{participant}.{name}"
        return (self.kits[participant] / "startup" / file).read_bytes()

    def bundle(self, app: str, signer: str = SERVER) -> bytes:
        """The example app ``app`` as a bundle signed by ``signer`` (the server identity by default)."""
        return build_bundle(EXAMPLE_APPS / app, self.pem(signer, "crt"), self.pem(signer, "key"))

    def client(self, site: str, caller: str = SERVER, **kwargs) -> AgentClient:
        """A client of ``site``'s agent with ``caller``'s identity (the server, an admin, a site)."""
        if caller in SITES:  # a site's kit is no caller kit; build from its PEM files
            pems = (self.pem(caller, "crt"), self.pem(caller, "key"), self.pem(caller, "rootCA"))
            return AgentClient(site, self.address(site), *pems, **kwargs)
        return load_caller_kit(self.kits[caller]).client(site, **kwargs)


def provision_federation(root: Path, name: str) -> Federation:
    ports = {site: free_port() for site in SITES}
    project_file = root / "project.yml"
    project_file.write_text(project_yaml(name, ports))
    result = provision(load_project(project_file), root / "workspace")
    return Federation(name, root / "workspace", dict(result.kits), ports)


class AgentProcess(poc.AgentProcess):
    """A ``flare-agent start`` child process for one site's kit, with what the tests look at."""

    def __init__(self, federation: Federation, site: str, extra_args: tuple[str, ...] = ()):
        super().__init__(federation.kits[site], site, federation.ports[site], federation.server_kit, extra_args)
        self.federation = federation

    @property
    def work_dir(self) -> Path:
        return self.kit / "work"

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"agent of {self.site} did not exit in {timeout} s:\n{self.log_tail()}") from None

    def restart(self) -> "AgentProcess":
        self.stop()
        return self.start()

    def ensure_running(self) -> "AgentProcess":
        return self if self.alive else self.start()

    def audit_entries(self) -> list[dict]:
        return read_audit_log(self.work_dir / AUDIT_FILE)

    def task_dir(self, task_id: str) -> Path:
        return self.work_dir / "tasks" / task_id

    def worker_pids(self, task_id: str) -> list[int]:
        """The live processes of a task's worker (read from /proc)."""
        return worker_processes(self.task_dir(task_id))


def _wait_until(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Federation:
    return provision_federation(tmp_path_factory.mktemp("federation"), "transport_test")


@pytest.fixture(scope="module")
def other_federation(tmp_path_factory) -> Federation:
    """A second project: its own root CA, the same participant names."""
    return provision_federation(tmp_path_factory.mktemp("other_federation"), "other_project")


@pytest.fixture(scope="module")
def make_agent(federation):
    """``make_agent(site, *extra_args)``: an agent process (not started), stopped at the module's end."""
    made: list[AgentProcess] = []

    def make(site: str, *extra_args: str) -> AgentProcess:
        made.append(AgentProcess(federation, site, extra_args))
        return made[-1]

    yield make
    for process in made:
        if process.alive:
            process.stop()


@pytest.fixture(scope="module")
def agent(make_agent) -> AgentProcess:
    """site-1's agent, running for the module (tests that stop it start it again)."""
    return make_agent("site-1").start()


@pytest.fixture(scope="session")
def wait_until():
    """``wait_until(condition, timeout, what)``: poll until truthy, fail after ``timeout`` seconds."""
    return _wait_until


# ---- the task manager's tests (test_runtime_tasks, test_runtime_launcher): one provisioned
# federation and an app store with the probe app per module; managers stopped after each test


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return runtime_support.provision_federation(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def probe_store(fed, tmp_path_factory):
    """One app store with the probe app deployed, shared by the module's task managers."""
    base = tmp_path_factory.mktemp("store")
    store = runtime_support.new_store(fed, base / "apps")
    store.deploy(runtime_support.bundle_file(fed, runtime_support.write_probe_app(base / "probe"), base / "probe.zip"))
    return store


@pytest.fixture
def make_manager(probe_store, tmp_path):
    managers = []

    def make(**settings_kwargs) -> TaskManager:
        settings = runtime_support.site_settings(tmp_path / "site", **settings_kwargs)
        manager = TaskManager(settings, probe_store, runtime_support.SITE)
        manager.start()
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.close()


@pytest.fixture
def tasks(make_manager) -> TaskManager:
    return make_manager()

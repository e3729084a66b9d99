"""The deployment's scripts, run for real: the kit's docker.sh, compose's provisioning and
health checks, the relay and an agent that dials out to it as compose runs them, the demo
data and the Airflow image check.

``docker`` itself is not available here: docker.sh runs against a stand-in ``docker``
on PATH that records its arguments, so the test sees the exact ``docker run`` line. The
agent runs as a real ``flare-agent`` process from a kit laid out as the image lays it
out (``data`` and ``work`` links to the mounted folders).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
from container_files import (
    COMPOSE_FILE,
    COMPOSE_PROJECT_FILE,
    DOCKER,
    KIT_MOUNTS,
    load_yaml,
    split_volume,
)

from flare_provider.provisioning import load_project, provision, verify_folder
from flare_provider.provisioning.kits import connection_id

BIN = Path(sys.executable).parent
SHELL_SCRIPTS = sorted(DOCKER.glob("*.sh"))
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def run(command: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env)


def owner(path: Path) -> str:
    info = path.stat()
    return f"{info.st_uid}:{info.st_gid}"


def tree_owners(path: Path) -> set[str]:
    return {owner(p) for p in [path, *path.rglob("*")]}


# ---- static checks of every shell script -------------------------------------------------


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script):
    shell = "sh" if script.read_text().startswith("#!/bin/sh") else "bash"
    assert run([shell, "-n", str(script)]).returncode == 0
    result = run([str(BIN / "shellcheck"), "--severity=style", str(script)])
    assert result.returncode == 0, result.stdout


# ---- the kit's docker.sh --------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_kits(tmp_path_factory, sample_project_file):
    """The sample project (it names a docker_image), provisioned once."""
    return provision(load_project(sample_project_file), tmp_path_factory.mktemp("sample"))


@pytest.fixture
def site_kit(sample_kits, tmp_path) -> Path:
    """A copy of hospital-a's kit with a data folder, owned by a non-root user."""
    kit = shutil.copytree(sample_kits.kits["hospital-a"], tmp_path / "hospital-a")
    (kit / "data").mkdir()
    if os.geteuid() == 0:  # as root, hand the kit to someone else, as a site would
        for path in [kit, *kit.rglob("*")]:
            os.chown(path, 4321, 4321, follow_symlinks=False)
    return kit


@pytest.fixture
def fake_docker(tmp_path) -> tuple[Path, Path]:
    """A folder for PATH with a ``docker`` that records its arguments, and the record."""
    folder = tmp_path / "bin"
    folder.mkdir()
    record = tmp_path / "docker-args"
    (folder / "docker").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n')
    (folder / "docker").chmod(0o755)
    return folder, record


def docker_sh(kit: Path, fake_docker, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str] | None]:
    folder, record = fake_docker
    record.unlink(missing_ok=True)
    environment = {"PATH": f"{folder}:/usr/bin:/bin", "HOME": str(kit.parent), **env}
    result = run([str(kit / "startup" / "docker.sh"), *args], env=environment)
    return result, record.read_text().splitlines() if record.exists() else None


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == option]


def test_kit_docker_sh_is_valid_bash(sample_kits):
    script = sample_kits.kits["hospital-a"] / "startup" / "docker.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    assert run(["bash", "-n", str(script)]).returncode == 0
    result = run([str(BIN / "shellcheck"), "--severity=style", str(script)])
    assert result.returncode == 0, result.stdout


def test_kit_docker_sh_runs_the_image_with_the_kit_read_only(site_kit, fake_docker):
    result, argv = docker_sh(site_kit, fake_docker, "--log-level", "DEBUG")
    assert result.returncode == 0, result.stderr
    assert argv[:2] == ["run", "--rm"]
    # The image, then the agent's arguments: the kit at /kit, and what the caller added.
    image_at = argv.index("flare-agent:latest")
    assert argv[image_at + 1 :] == ["start", "--kit", "/kit", "--log-level", "DEBUG"]
    volumes = {v.split(":")[1]: v.split(":") for v in option_values(argv, "--volume")}
    assert volumes == {
        "/kit/startup": [str(site_kit / "startup"), "/kit/startup", "ro"],
        "/kit/local": [str(site_kit / "local"), "/kit/local", "ro"],
        "/data": [str(site_kit / "data"), "/data", "ro"],
        "/work": [str(site_kit / "work"), "/work"],
    }
    assert {target: (parts[2] if len(parts) == 3 else "rw") for target, parts in volumes.items()} == KIT_MOUNTS
    assert (site_kit / "work").is_dir()
    key_owner = owner(site_kit / "startup" / "hospital-a.key")
    assert key_owner.split(":")[0] != "0"
    assert option_values(argv, "--user") == [key_owner]
    assert owner(site_kit / "work") == key_owner  # the agent can write its work folder
    assert option_values(argv, "--publish") == []  # it dials out to the relays: no port at all
    assert "--read-only" in argv and option_values(argv, "--cap-drop") == ["ALL"]
    assert option_values(argv, "--stop-signal") == ["SIGTERM"]
    assert "--gpus" not in argv and option_values(argv, "--env") == ["NVIDIA_VISIBLE_DEVICES=void"]


def test_kit_docker_sh_passes_gpus_through_when_the_host_has_them(site_kit, fake_docker, tmp_path):
    folder, _ = fake_docker
    (folder / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
    (folder / "nvidia-smi").chmod(0o755)
    _, argv = docker_sh(site_kit, fake_docker)
    assert option_values(argv, "--gpus") == ["all"] and "--env" not in argv
    _, argv = docker_sh(site_kit, fake_docker, GPUS='"device=1"')
    assert option_values(argv, "--gpus") == ['"device=1"']
    _, argv = docker_sh(site_kit, fake_docker, GPUS="none")
    assert "--gpus" not in argv


def test_kit_docker_sh_takes_host_folders_image_and_address(site_kit, fake_docker, tmp_path):
    settings = site_kit / "local" / "site.yaml"
    settings.write_text(settings.read_text().replace("connect: outbound", "connect: listen"))  # a LAN site
    data, work = tmp_path / "elsewhere-data", tmp_path / "elsewhere-work"
    data.mkdir()
    _, argv = docker_sh(
        site_kit,
        fake_docker,
        DATA_DIR=str(data),
        WORK_DIR=str(work),
        FLARE_AGENT_IMAGE="images.example/flare-agent:1.2",
        BIND_ADDRESS="10.1.2.3",
    )
    volumes = option_values(argv, "--volume")
    assert f"{data}:/data:ro" in volumes and f"{work}:/work" in volumes and work.is_dir()
    assert "images.example/flare-agent:1.2" in argv
    assert option_values(argv, "--publish") == ["10.1.2.3:8102:8102"]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RUN_AS": "0:0"}, "would run as root"),
        ({"DATA_DIR": "/nonexistent/data"}, "data folder /nonexistent/data does not exist"),
    ],
)
def test_kit_docker_sh_refuses_without_starting_anything(site_kit, fake_docker, env, message):
    result, argv = docker_sh(site_kit, fake_docker, **env)
    assert result.returncode == 1 and message in result.stderr
    assert argv is None, "docker was run anyway"


def test_kit_docker_sh_warns_when_site_yaml_moves_the_folders(site_kit, fake_docker):
    settings = site_kit / "local" / "site.yaml"
    settings.write_text(settings.read_text().replace("data_dir: data", "data_dir: /mnt/hospital-data"))
    result, argv = docker_sh(site_kit, fake_docker)
    assert argv is not None and "warning: local/site.yaml should say 'data_dir: data'" in result.stderr


# ---- compose's provisioning ------------------------------------------------------------


def compose_kit_mounts() -> dict[str, str]:
    """Where flare-provision mounts each kit volume under FLARE_KITS (e.g. 'hospital-a/startup')."""
    service = load_yaml(COMPOSE_FILE)["services"]["flare-provision"]
    kits = service["environment"]["FLARE_KITS"]
    targets = [split_volume(v)[1] for v in service["volumes"]]
    return {t: t[len(kits) + 1 :] for t in targets if t.startswith(kits + "/")}


# Who the kits go to: as root (the compose service is root), the images' users, the
# script's defaults; otherwise only the current user can be given anything.
AS_ROOT = os.geteuid() == 0
ME = f"{os.getuid()}:{os.getgid()}"
AGENT_OWNER = "10001:10001" if AS_ROOT else ME
SERVER_OWNER = "50000:0" if AS_ROOT else ME


def provision_kits(project_file: Path, workspace: Path, kits: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "FLARE_PROJECT_FILE": str(project_file),
        "FLARE_WORKSPACE": str(workspace),
        "FLARE_KITS": str(kits),
    }
    if not AS_ROOT:
        env.update(FLARE_AGENT_OWNER=ME, FLARE_SERVER_KIT_OWNER=ME)
    result = run(["bash", str(DOCKER / "provision_kits.sh")], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def compose_kits(tmp_path_factory) -> tuple[Path, Path]:
    """docker/project.yml provisioned by provision_kits.sh into compose's volume layout."""
    root = tmp_path_factory.mktemp("compose")
    kits = root / "kits"
    for mount in compose_kit_mounts().values():
        (kits / mount).mkdir(parents=True)  # the volumes, as compose mounts them
    provision_kits(COMPOSE_PROJECT_FILE, root / "workspace", kits)
    return root, kits


def test_provisioning_publishes_each_kit_into_its_volumes(compose_kits):
    root, kits = compose_kits
    project = load_project(COMPOSE_PROJECT_FILE)
    for site in project.clients:
        startup = kits / site.name / "startup"
        assert verify_folder(startup).ok
        agent_config = json.loads((startup / "agent.json").read_text())
        # The site dials out to the relay compose runs as the service named like the server.
        assert agent_config["relays"] == [{"name": "airflow-server", "host": "airflow-server", "port": 8002}]
        assert stat.S_IMODE((startup / f"{site.name}.key").stat().st_mode) == 0o600
        settings = (kits / site.name / "local" / "site.yaml").read_text()
        assert "data_dir: data" in settings and "\nconnect: outbound\n" in settings
        # The agent's user can read its key; nobody else is given anything.
        assert tree_owners(startup) | tree_owners(kits / site.name / "local") == {AGENT_OWNER}
    server = kits / project.server.name
    assert verify_folder(server / "startup").ok
    assert tree_owners(server) == {SERVER_OWNER}
    connection = json.loads((server / "startup" / "connections.json").read_text())[connection_id(project.name)]
    assert set(json.loads(connection["extra"])["sites"]) == {"hospital-a", "hospital-b"}
    # The relay starts from this kit: it says where to listen.
    assert json.loads((server / "startup" / "server.json").read_text())["relay"]["port"] == 8002
    # Admin kits have no volume: they stay in the workspace only.
    assert not (kits / project.admins[0].name).exists()
    assert (root / "workspace" / project.name / "prod_00" / project.admins[0].name / "startup").is_dir()


def test_provisioning_again_keeps_site_kits_and_adds_sites(tmp_path):
    kits = tmp_path / "kits"
    for mount in compose_kit_mounts().values():
        (kits / mount).mkdir(parents=True)
    project_file = tmp_path / "project.yml"
    shutil.copy(COMPOSE_PROJECT_FILE, project_file)
    provision_kits(project_file, tmp_path / "workspace", kits)
    settings = kits / "hospital-a" / "local" / "site.yaml"
    settings.write_text(settings.read_text().replace("gpus: []", "gpus: [0]"))  # the site's own edit
    fingerprint = json.loads((kits / "hospital-a" / "startup" / "agent.json").read_text())["root_fingerprint"]

    # A third site: its volumes appear, the project names it; the next run issues only it.
    text = project_file.read_text().replace(
        "  - name: admin@lead-lab.example",
        "  - name: hospital-c\n    type: client\n    org: hospital_c\n    connect: outbound\n"
        "  - name: admin@lead-lab.example",
    )
    project_file.write_text(text)
    for part in ("startup", "local"):
        (kits / "hospital-c" / part).mkdir(parents=True)
    result = provision_kits(project_file, tmp_path / "workspace", kits)
    assert "hospital-a: kit already published" in result.stdout
    assert "gpus: [0]" in settings.read_text()
    assert verify_folder(kits / "hospital-c" / "startup", fingerprint).ok
    connections = json.loads((kits / "airflow-server" / "startup" / "connections.json").read_text())
    (connection,) = connections.values()
    assert set(json.loads(connection["extra"])["sites"]) == {"hospital-a", "hospital-b", "hospital-c"}
    assert sorted(p.name for p in (tmp_path / "workspace" / "hospital_federation").glob("prod_*")) == [
        "prod_00",
        "prod_01",
    ]


def test_provisioning_names_a_missing_project_file(tmp_path):
    env = {
        **os.environ,
        "FLARE_PROJECT_FILE": str(tmp_path / "nope.yml"),
        "FLARE_WORKSPACE": str(tmp_path / "ws"),
        "FLARE_KITS": str(tmp_path),
    }
    result = run(["bash", str(DOCKER / "provision_kits.sh")], env=env)
    assert result.returncode == 2 and "nope.yml not found" in result.stderr
    assert not (tmp_path / "ws").exists()


# Reads a connection as a worker does and prints how it reaches the sites (never the key).
_READ_CONNECTION = """
import json, sys
from airflow.models.connection import Connection
from airflow.utils.session import create_session
from sqlalchemy import select
from flare_provider.hooks.flare import FlareHook
with create_session() as session:
    conn = session.scalar(select(Connection).where(Connection.conn_id == sys.argv[1]))
    kit = FlareHook.kit_from_connection(conn)
print(json.dumps({"sites": {name: site.connect for name, site in kit.sites.items()},
                  "relays": [relay.address for relay in kit.relays]}))
"""


def test_airflow_init_imports_the_published_server_kit(compose_kits, airflow_db):
    from cryptography.fernet import Fernet

    _, kits = compose_kits
    project = load_project(COMPOSE_PROJECT_FILE)
    init = load_yaml(COMPOSE_FILE)["services"]["airflow-init"]
    assert "flare_provider.cli kit import-connection --overwrite" in init["command"][0]
    server_kit = kits / project.server.name
    # As in compose, every component shares one Fernet key: the private key is stored encrypted.
    env = {**os.environ, "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode()}
    try:
        for _ in range(2):  # every compose start imports again
            command = [sys.executable, "-m", "flare_provider.cli", "kit", "import-connection", "--overwrite", str(server_kit)]
            result = run(command, env=env)
            assert result.returncode == 0, result.stderr
            assert "PRIVATE KEY" not in result.stdout + result.stderr
        result = run([sys.executable, "-c", _READ_CONNECTION, connection_id(project.name)], env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {
            "sites": {"hospital-a": "outbound", "hospital-b": "outbound"},
            "relays": ["airflow-server:8002"],  # the relay service, on the compose network
        }
    finally:  # encrypted with this test's key: no other test could read it
        delete_connection(connection_id(project.name))


def delete_connection(conn_id: str) -> None:
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    with create_session() as session:
        session.execute(delete(Connection).where(Connection.conn_id == conn_id))


# ---- the agent as the image runs it ----------------------------------------------------------


@pytest.fixture(scope="module")
def container_kit(tmp_path_factory) -> tuple[Path, Path, int]:
    """A site kit published by provision_kits.sh, laid out as in the agent image:
    ``kit/data`` and ``kit/work`` link to the mounted /data and /work."""
    root = tmp_path_factory.mktemp("container")
    port = free_port()
    project_file = root / "project.yml"
    project_file.write_text(
        "api_version: 3\nname: container_check\nparticipants:\n"
        "  - {name: server, type: server, org: lead}\n"
        f"  - {{name: site-1, type: client, org: org_a, agent_host: 127.0.0.1, agent_port: {port}, connect: listen}}\n"
    )
    kits = root / "kits"
    for part in ("site-1/startup", "site-1/local", "server"):
        (kits / part).mkdir(parents=True)
    provision_kits(project_file, root / "workspace", kits)
    kit = kits / "site-1"
    for name in ("data", "work"):
        (root / name).mkdir()
        (kit / name).symlink_to(root / name)
    return kit, root, port


def healthcheck(kit: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, str(DOCKER / "agent_healthcheck.py"), "--kit", str(kit), *args], timeout=30)


def test_agent_serves_from_the_image_layout_and_stops_on_sigterm(container_kit):
    kit, root, port = container_kit
    assert healthcheck(kit).returncode == 1  # nothing listens yet
    # The image's command, listening on loopback only for the test.
    agent = subprocess.Popen(
        [str(BIN / "flare-agent"), "start", "--kit", str(kit), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: agent.poll() is not None or healthcheck(kit).returncode == 0, START_TIMEOUT, "the agent")
        assert agent.poll() is None, agent.stderr.read()
        healthy = healthcheck(kit)
        assert healthy.returncode == 0 and f"127.0.0.1:{port}" in healthy.stdout
        # Its work went to the mounted work folder, through the kit's link.
        assert any((root / "work").iterdir())
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=STOP_TIMEOUT) == 0, agent.stderr.read()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=STOP_TIMEOUT)
    wait_until(lambda: healthcheck(kit).returncode == 1, 10, "the port to close")


def test_agent_healthcheck_reports_a_kit_it_cannot_read(tmp_path):
    result = healthcheck(tmp_path)
    assert result.returncode == 1 and "unhealthy: cannot tell where the agent serves" in result.stderr
    assert "site.yaml" in result.stderr


# ---- the relay and an agent that dials out, as compose runs them ------------------------------


@pytest.fixture(scope="module")
def relay_kits(tmp_path_factory) -> tuple[Path, Path, Path, int]:
    """A server kit and an outbound site's kit published by provision_kits.sh, the site's laid
    out as in the agent image; the relay is reached on loopback at a free port."""
    root = tmp_path_factory.mktemp("relay")
    port = free_port()
    project_file = root / "project.yml"
    project_file.write_text(
        "api_version: 3\nname: relay_check\nparticipants:\n"
        f"  - {{name: server, type: server, org: lead, host_names: [127.0.0.1], fed_learn_port: {port}}}\n"
        "  - {name: site-1, type: client, org: org_a, connect: outbound}\n"
    )
    kits = root / "kits"
    for part in ("site-1/startup", "site-1/local", "server"):
        (kits / part).mkdir(parents=True)
    provision_kits(project_file, root / "workspace", kits)
    site = kits / "site-1"
    for name in ("data", "work"):
        (root / name).mkdir()
        (site / name).symlink_to(root / name)
    return kits / "server", site, root, port


def relay_healthcheck(kit: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, str(DOCKER / "relay_healthcheck.py"), "--kit", str(kit), *args], timeout=30)


def stop(process: subprocess.Popen) -> int:
    """SIGTERM, as ``docker stop`` sends; the exit status (a kill past the timeout fails the test)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
            pytest.fail(f"{process.args[0]} did not stop on SIGTERM")
    return process.returncode


def test_site_reached_through_the_relay_as_compose_runs_them(relay_kits):
    server_kit, site_kit, root, port = relay_kits
    unhealthy = relay_healthcheck(server_kit)
    assert unhealthy.returncode == 1 and f"127.0.0.1:{port}" in unhealthy.stderr  # nothing listens yet
    logs = root / "logs"
    logs.mkdir()
    # The relay service's command (loopback only for the test), then the site's agent.
    with (logs / "relay.log").open("w") as relay_log, (logs / "agent.log").open("w") as agent_log:
        relay = subprocess.Popen(
            [str(BIN / "flare"), "relay", "start", "--kit", str(server_kit), "--host", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=relay_log,
        )
        agent = None
        try:
            wait_until(lambda: relay.poll() is not None or relay_healthcheck(server_kit).returncode == 0,
                       START_TIMEOUT, "the relay")
            assert relay.poll() is None, (logs / "relay.log").read_text()
            healthy = relay_healthcheck(server_kit)
            assert f"the relay accepts connections on 127.0.0.1:{port}" in healthy.stdout
            agent = subprocess.Popen(
                [str(BIN / "flare-agent"), "start", "--kit", str(site_kit)],
                stdout=subprocess.DEVNULL,
                stderr=agent_log,
            )
            wait_until(
                lambda: agent.poll() is not None or "attached to relay server" in (logs / "agent.log").read_text(),
                START_TIMEOUT,
                "the agent to attach to the relay",
            )
            assert agent.poll() is None, (logs / "agent.log").read_text()
            # The agent listens on no port: its health check finds its Unix socket.
            site_health = healthcheck(site_kit)
            assert site_health.returncode == 0 and "dials out to its relays" in site_health.stdout, site_health.stderr
            # The Airflow side's identity reaches the site through the relay, as `flare status` does.
            status = run([str(BIN / "flare"), "status", "--kit", str(server_kit)], timeout=60)
            assert status.returncode == 0, status.stdout + status.stderr
            (row,) = [line.split() for line in status.stdout.splitlines() if line.startswith("site-1")]
            assert row[1:3] == ["server:attached", "up"], status.stdout  # its attachment, as it reports it
            assert stop(agent) == 0, (logs / "agent.log").read_text()
            assert stop(relay) == 0, (logs / "relay.log").read_text()
        finally:
            for process in (agent, relay):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait(timeout=STOP_TIMEOUT)
    assert relay_healthcheck(server_kit).returncode == 1
    assert "PRIVATE KEY" not in (logs / "relay.log").read_text() + (logs / "agent.log").read_text()


def test_relay_healthcheck_reports_a_kit_it_cannot_read(tmp_path):
    result = relay_healthcheck(tmp_path)
    assert result.returncode == 1 and "unhealthy: cannot tell the relay's port" in result.stderr
    assert "server.json" in result.stderr


# ---- the Airflow image's health check and build check -----------------------------------------


class _VersionHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/api/v2/version"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b'{"version": "3"}' if ok else b"")

    def log_message(self, *args):
        pass


@pytest.fixture
def api_server():
    server = HTTPServer(("127.0.0.1", 0), _VersionHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    thread.join(timeout=10)


def airflow_healthcheck(*args: str, **env: str) -> subprocess.CompletedProcess:
    return run(["bash", str(DOCKER / "airflow_healthcheck.sh"), *args], env={**os.environ, **env}, timeout=30)


def test_airflow_healthcheck_checks_the_component_pid_1_runs(api_server, tmp_path):
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"/usr/bin/dumb-init\0--\0/entrypoint\0api-server\0")
    assert airflow_healthcheck(FLARE_PID1_CMDLINE=str(cmdline), AIRFLOW__API__PORT=str(api_server)).returncode == 0
    assert airflow_healthcheck("api-server", AIRFLOW__API__PORT=str(free_port())).returncode != 0
    one_shot = tmp_path / "one-shot"
    one_shot.write_bytes(b"/bin/bash\0-c\0airflow db migrate\0")
    assert airflow_healthcheck(FLARE_PID1_CMDLINE=str(one_shot)).returncode == 0
    unknown = airflow_healthcheck("webserver")
    assert unknown.returncode == 2 and "unknown Airflow component 'webserver'" in unknown.stderr


def test_airflow_image_check_finds_torch_and_nothing_else():
    """In this environment torch is installed (the agent's tests need it): the check must say so,
    and only that: the provider's Airflow modules import, without pulling torch in."""
    result = run([sys.executable, str(DOCKER / "check_airflow_image.py")], env=os.environ.copy())
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "image check failed: torch is installed; the Airflow image must not carry PyTorch"
    ]


# ---- demo data ----------------------------------------------------------------------------


def test_demo_data_fills_each_sites_folder(tmp_path):
    folders = [tmp_path / "hospital-a", tmp_path / "hospital-b"]
    result = run([sys.executable, str(DOCKER / "demo_data.py"), "--owner", str(os.getuid()), *map(str, folders)])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for folder in folders:
        assert summary[str(folder)]["train"] > 0
        with np.load(folder / "train.npz", allow_pickle=False) as data:
            assert data["x"].shape[1] == 64 and data["x"].dtype == np.float32
        assert {p.stat().st_uid for p in [folder, *folder.iterdir()]} == {os.getuid()}


# ---- the snapshot store's set-up ------------------------------------------------------------

# A stand-in for MinIO's client: records each call, keeps the policy it is given, and
# answers "admin user info" with what FAKE_USER_INFO says.
_FAKE_MC = """#!/bin/sh
echo "$*" >> "$RECORD"
case "$1 $2 $3" in
  "admin policy create") cp "$6" "$RECORD.policy" ;;
  "admin user info") echo "$FAKE_USER_INFO" ;;
esac
"""


def minio_init(tmp_path: Path, user_info: str) -> tuple[subprocess.CompletedProcess, list[str], dict]:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    (folder / "mc").write_text(_FAKE_MC)
    (folder / "mc").chmod(0o755)
    record = tmp_path / "mc-calls"
    record.unlink(missing_ok=True)
    env = {
        "PATH": f"{folder}:/usr/bin:/bin",
        "RECORD": str(record),
        "FAKE_USER_INFO": user_info,
        "MINIO_ROOT_USER": "root-user",
        "MINIO_ROOT_PASSWORD": "root-secret-0123",
        "FLARE_SNAPSHOT_BUCKET": "snapshots",
        "FLARE_S3_ACCESS_KEY": "airflow-snapshots",
        "FLARE_S3_SECRET_KEY": "s3-secret-4567",
    }
    result = run(["sh", str(DOCKER / "minio_init.sh")], env=env)
    policy = json.loads(Path(f"{record}.policy").read_text()) if Path(f"{record}.policy").exists() else {}
    return result, record.read_text().splitlines() if record.exists() else [], policy


def test_minio_init_gives_airflow_the_snapshot_bucket_only(tmp_path):
    result, calls, policy = minio_init(tmp_path, user_info="AccessKey: airflow-snapshots\nPolicyName:")
    assert result.returncode == 0, result.stderr
    assert calls[:2] == ["mb --ignore-existing store/snapshots", "anonymous set none store/snapshots"]
    assert "admin user add store airflow-snapshots s3-secret-4567" in calls
    assert calls[-1] == "admin policy attach store flare-snapshots --user airflow-snapshots"
    assert not any("root-secret-0123" in call for call in calls), "the root password was a command argument"
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::snapshots", "arn:aws:s3:::snapshots/*"}


def test_minio_init_runs_again_without_attaching_twice(tmp_path):
    result, calls, _ = minio_init(tmp_path, user_info="AccessKey: airflow-snapshots\nPolicyName: flare-snapshots")
    assert result.returncode == 0, result.stderr
    assert not any(call.startswith("admin policy attach") for call in calls)

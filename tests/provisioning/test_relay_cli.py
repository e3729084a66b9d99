"""`flare relay start` and the server kit's start.sh / stop.sh, run for real; kits checked before use."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flare_provider.cli import main as flare
from flare_provider.client import KitError, load_caller_kit
from flare_provider.provisioning import load_project, provision

BIN = Path(sys.executable).parent
RELAY = [sys.executable, "-m", "flare_provider.cli", "relay", "start"]
START_TIMEOUT = 30.0
# `time level logger: message`, as the relay logs to stderr
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO flare_provider\.relay\.server: ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    """Two servers whose relays may listen on this machine, a site and an admin."""
    root = tmp_path_factory.mktemp("relay")
    ports = [free_port(), free_port()]
    project_file = root / "project.yml"
    project_file.write_text(
        "api_version: 3\nname: relay_check\nparticipants:\n"
        f"  - {{name: relay-1, type: server, org: lead, host_names: [127.0.0.1], fed_learn_port: {ports[0]}}}\n"
        f"  - {{name: relay-2, type: server, org: lead, host_names: [localhost], fed_learn_port: {ports[1]}}}\n"
        "  - {name: site-1, type: client, org: a}\n"
        "  - {name: ops@lead.example, type: admin, org: lead, role: project_admin}\n"
    )
    result = provision(load_project(project_file), root / "workspace")
    return result, dict(zip(["relay-1", "relay-2"], ports, strict=True))


def copy_kit(kits, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(kits[0].kits[name], tmp_path / name))


def run_relay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RELAY, *args], capture_output=True, text=True, timeout=60, check=False)


def accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("tamper, problem", [
    (lambda s: (s / "server.json").write_text((s / "server.json").read_text().replace('"::"', '"1.2.3.4"')),
     "changed file: server.json"),
    (lambda s: (s / "extra.pem").write_text("planted"), "added file: extra.pem"),
    (lambda s: (s / "stop.sh").unlink(), "missing file: stop.sh"),
])
def test_a_tampered_server_kit_starts_no_relay(kits, tmp_path, tamper, problem):
    kit = copy_kit(kits, "relay-1", tmp_path)
    tamper(kit / "startup")
    port = kits[1]["relay-1"]
    result = run_relay("--kit", str(kit), "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()  # one line, naming the file
    assert line.startswith("error: refusing to start the relay:") and problem in line
    assert not accepts(port)


def test_a_kit_of_another_root_is_refused_when_the_root_is_pinned(kits, tmp_path):
    other = provision(kits[0].project, tmp_path / "other")  # same names, another root CA
    result = run_relay("--kit", str(other.kits["relay-1"]), "--root-fingerprint", kits[0].root_fingerprint)
    assert result.returncode == 1 and "rootCA.pem is not the project's root CA" in result.stderr


def test_a_site_kit_is_no_relay_kit(kits):
    result = run_relay("--kit", str(kits[0].kits["site-1"]))
    assert result.returncode == 2 and "server.json not found" in result.stderr


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def test_the_relay_serves_from_its_kit_until_sigterm(kits):
    port = kits[1]["relay-2"]
    relay = subprocess.Popen([*RELAY, "--kit", str(kits[0].kits["relay-2"]), "--host", "127.0.0.1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(relay.stderr, lines), daemon=True).start()
    seen = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not any("listening on" in line for line in seen):
            assert relay.poll() is None, "".join(seen)
            assert time.monotonic() < deadline, f"no 'listening' line in {START_TIMEOUT:.0f} s: {''.join(seen)}"
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                pass
        listening = next(line for line in seen if "listening on" in line)
        assert LOG_LINE.match(listening) and f"relay-2 listening on 127.0.0.1:{port}" in listening
        assert accepts(port)  # server.json's port, the participant's fed_learn_port
        # run_relay installs its SIGTERM handler just after it logs that it listens.
        time.sleep(0.5)
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=30) == 0
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait(timeout=30)


def test_start_sh_and_stop_sh_run_the_relay_in_the_background(kits, tmp_path):
    kit = copy_kit(kits, "relay-1", tmp_path)
    port = kits[1]["relay-1"]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    started = subprocess.run([str(kit / "startup" / "start.sh"), "--host", "127.0.0.1"], capture_output=True,
                             text=True, timeout=60, env=env, check=False)
    try:
        assert started.returncode == 0, started.stderr
        assert f"relay relay-1 started (pid {(kit / 'run' / 'relay.pid').read_text().strip()})" in started.stdout
        deadline = time.monotonic() + START_TIMEOUT
        while not accepts(port):
            assert time.monotonic() < deadline, (kit / "run" / "relay.log").read_text()
            time.sleep(0.2)
        again = subprocess.run([str(kit / "startup" / "start.sh")], capture_output=True, text=True, timeout=60,
                               env=env, check=False)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        stopped = subprocess.run([str(kit / "startup" / "stop.sh")], capture_output=True, text=True, timeout=60,
                                 env=env, check=False)
    assert stopped.returncode == 0 and "relay relay-1 stopped" in stopped.stdout
    assert not (kit / "run" / "relay.pid").exists() and not accepts(port)
    assert "listening on" in (kit / "run" / "relay.log").read_text()


def test_start_sh_reports_a_relay_that_could_not_start(kits, tmp_path):
    kit = copy_kit(kits, "relay-1", tmp_path)
    (kit / "startup" / "extra.pem").write_text("planted")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    started = subprocess.run([str(kit / "startup" / "start.sh")], capture_output=True, text=True, timeout=60,
                             env=env, check=False)
    assert started.returncode == 1
    assert "did not start" in started.stderr and "added file: extra.pem" in started.stderr
    assert not (kit / "run" / "relay.pid").exists()


# ---- caller kits are checked before the flare command uses them ---------------------------


def test_flare_status_refuses_a_tampered_admin_kit(kits, tmp_path, capsys):
    kit = copy_kit(kits, "ops@lead.example", tmp_path)
    config = kit / "startup" / "admin.json"
    config.write_text(config.read_text().replace('"project_admin"', '"member"'))
    assert flare(["status", "--kit", str(kit)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: startup kit") and "changed file: admin.json" in err
    with pytest.raises(KitError, match="changed file: admin.json"):
        load_caller_kit(kit)
    assert load_caller_kit(kit, verify=False).kind == "admin"  # what a caller that opts out still reads


def test_a_caller_kit_is_checked_against_a_pinned_root(kits, tmp_path):
    other = provision(kits[0].project, tmp_path / "other")
    assert load_caller_kit(other.kits["relay-1"]).name == "relay-1"  # self-consistent
    with pytest.raises(KitError, match="is not the project's root CA"):
        load_caller_kit(other.kits["relay-1"], root_fingerprint=kits[0].root_fingerprint)


def test_an_intact_server_kit_loads_with_its_relays(kits):
    kit = load_caller_kit(kits[0].kits["relay-2"])
    assert [(r.name, r.port) for r in kit.relays] == [(name, port) for name, port in kits[1].items()]
    config = json.loads((kits[0].kits["relay-2"] / "startup" / "server.json").read_text())
    assert config["relay"] == {"host": "::", "port": kits[1]["relay-2"]}


def test_import_connection_verifies_the_server_kit_first(kits, tmp_path, airflow_db):
    kit = copy_kit(kits, "relay-1", tmp_path)
    conn_id = "flare_relay_check"

    def airflow(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "airflow", *args], capture_output=True, text=True, timeout=120)

    airflow("connections", "delete", conn_id)
    (kit / "startup" / "relay-1.crt").write_text("-----BEGIN CERTIFICATE-----\nforged\n-----END CERTIFICATE-----\n")
    refused = subprocess.run([sys.executable, "-m", "flare_provider.cli", "kit", "import-connection", str(kit)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "changed file: relay-1.crt" in refused.stderr, refused.stderr
    assert conn_id not in airflow("connections", "list", "-o", "plain").stdout  # nothing imported

    kit = copy_kit(kits, "relay-2", tmp_path / "intact")
    done = subprocess.run([sys.executable, "-m", "flare_provider.cli", "kit", "import-connection", str(kit), "--overwrite"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (got,) = json.loads(airflow("connections", "get", conn_id, "-o", "json").stdout)
    extra = got["extra_dejson"]
    assert [r["name"] for r in extra["relays"]] == ["relay-1", "relay-2"]
    airflow("connections", "delete", conn_id)

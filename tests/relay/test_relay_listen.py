"""Where a relay listens: by default every address of its machine, IPv6 and IPv4 (one
dual-stack socket), so sites reach it whichever family their name for it resolves to;
``--host`` (or server.json's relay host) narrows it. Real relay processes from a real
server kit, asked for their status over mutual TLS at 127.0.0.1 and at ::1."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from flare_provider.poc import free_port
from flare_provider.provisioning import load_project, provision

PROBE = Path(__file__).with_name("listen_probe.py")
RELAY = "relay-1"


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("listen")
    project = root / "project.yml"
    project.write_text("api_version: 3\nname: listen_check\nparticipants:\n"
                       f"  - {{name: {RELAY}, type: server, org: lead, host_names: [localhost]}}\n"
                       "  - {name: site-1, type: client, org: a}\n")
    return provision(load_project(project), root / "workspace").kits[RELAY]


def probe(kit: Path, port: int, *relay_args: str, namespace_setup: str | None = None) -> dict:
    """listen_probe.py's findings, run here or (``namespace_setup``) in a fresh network namespace."""
    command = [sys.executable, str(PROBE), str(kit), str(port), *relay_args]
    if namespace_setup is not None:
        command = ["unshare", "--net", "sh", "-c", f"{namespace_setup} && exec {shlex.join(command)}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GRPC_VERBOSITY": "ERROR"})
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_kit_has_the_relay_listen_on_every_address(kit):
    assert json.loads((kit / "startup" / "server.json").read_text())["relay"]["host"] == "::"


def test_by_default_the_relay_answers_on_ipv4_and_ipv6_loopback(kit):
    port = free_port()
    found = probe(kit, port)
    assert found["answers"]["127.0.0.1"] == RELAY, found
    if found["ipv6_loopback"]:
        assert found["answers"]["::1"] == RELAY, found
        assert f"{RELAY} listening on [::]:{port} (every address, IPv6 and IPv4)" in found["listening"], found
    elif found["dual_stack"]:  # IPv6 sockets but no ::1 (IPv6 switched off): the one socket still takes IPv4
        assert found["answers"]["::1"].startswith("no answer"), found
        assert f"{RELAY} listening on [::]:{port} (every address, IPv6 and IPv4)" in found["listening"], found
    else:  # no IPv6 at all: the fallback, every IPv4 address
        assert found["answers"]["::1"].startswith("no answer"), found
        assert f"{RELAY} listening on 0.0.0.0:{port} (every IPv4 address; no IPv6 on this machine" in found["listening"]


def test_without_an_ipv6_loopback_the_relay_still_answers_on_ipv4(kit):
    """A machine with IPv6 switched off (as in many containers): a namespace whose loopback has no ::1."""
    port = free_port()
    found = probe(kit, port, namespace_setup="ip link set lo up && sysctl -qw net.ipv6.conf.all.disable_ipv6=1 "
                                             "net.ipv6.conf.lo.disable_ipv6=1")
    assert not found["ipv6_loopback"], found
    assert found["answers"]["127.0.0.1"] == RELAY, found
    assert found["answers"]["::1"].startswith("no answer"), found
    assert f"{RELAY} listening on [::]:{port} (every address, IPv6 and IPv4)" in found["listening"], found


def test_host_0_0_0_0_keeps_the_relay_to_ipv4(kit):
    port = free_port()
    found = probe(kit, port, "--host", "0.0.0.0")
    assert found["answers"]["127.0.0.1"] == RELAY, found
    assert found["answers"]["::1"].startswith("no answer"), found
    assert f"{RELAY} listening on 0.0.0.0:{port}" in found["listening"], found

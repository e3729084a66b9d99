"""Several servers (NVIDIA FLARE's HA layout), relays and each site's connect mode in the kits."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from flare_provider.cli import main as flare
from flare_provider.client import load_caller_kit
from flare_provider.provisioning import ProjectError, load_project, parse_project, provision, verify_folder
from flare_provider.relay.dial import RelayEndpoint
from site_agent.kit_config import load_agent_config
from site_agent.site_settings import load_site_settings

REPO = Path(__file__).resolve().parents[2]
HA_PROJECT = REPO / "examples" / "project-ha.yml"
BIN = Path(sys.executable).parent
SERVERS = ["server1", "server2"]
RELAYS = [
    {"name": "server1", "host": "server1", "port": 8002},
    {"name": "server2", "host": "server2", "port": 8102},
]
OVERSEER_NOTE = "Airflow's scheduler plays the overseer's part (retries and failover)"


@pytest.fixture(scope="module")
def ha(tmp_path_factory):
    """The HA sample, provisioned once and read only by the tests below."""
    return provision(load_project(HA_PROJECT), tmp_path_factory.mktemp("ha"))


def read_json(kit: Path, name: str) -> dict:
    return json.loads((kit / "startup" / name).read_text())


def test_the_ha_sample_provisions_with_the_overseer_reported(tmp_path, capsys):
    project = load_project(HA_PROJECT)
    assert [s.name for s in project.servers] == SERVERS and project.server.name == "server1"
    assert [(s.fed_learn_port, s.admin_port) for s in project.servers] == [(8002, 8003), (8102, 8103)]
    assert [c.name for c in project.clients] == ["site-1", "site-2"]
    assert "overseer" not in [p.name for p in project.participants]
    assert len(project.warnings) == 2 and all(OVERSEER_NOTE in w for w in project.warnings)
    assert any("participant 'overseer'" in w for w in project.warnings)
    assert any("overseer_agent" in w for w in project.warnings)

    assert flare(["provision", "-p", str(HA_PROJECT), "-w", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.err.count(OVERSEER_NOTE) == 2
    prod = tmp_path / "ha_federation" / "prod_00"
    for name in [*SERVERS, "site-1", "site-2", "admin@lead-lab.example"]:
        assert verify_folder(prod / name / "startup").ok, name


def test_every_server_gets_its_own_kit_relay_and_connection(ha):
    connections = {}
    for server, port in zip(SERVERS, (8002, 8102), strict=True):
        kit = ha.kits[server]
        for script in ("start.sh", "stop.sh"):
            assert stat.S_IMODE((kit / "startup" / script).stat().st_mode) == 0o755
        config = read_json(kit, "server.json")
        assert config["server"] == server
        assert config["relay"] == {"host": "::", "port": port}
        assert config["relays"] == RELAYS
        assert {site["connect"] for site in config["sites"].values()} == {"outbound"}
        (conn_id, fields), = read_json(kit, "connections.json").items()
        extra = json.loads(fields["extra"])
        assert extra["relays"] == RELAYS and extra["sites"] == config["sites"]
        # Each connection carries its own server's identity.
        assert fields["login"] == server
        assert fields["password"] == (kit / "startup" / f"{server}.key").read_text()
        cert = x509.load_pem_x509_certificate(extra["cert_pem"].encode())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == server
        connections[server] = conn_id
        readme = (kit / "startup" / "readme.txt").read_text()
        assert "startup/start.sh" in readme and f"TCP port {port} inbound" in readme
    assert set(connections.values()) == {"flare_ha_federation"}


def test_sites_list_both_relays_and_accept_both_servers(ha):
    for site in ("site-1", "site-2"):
        kit = ha.kits[site]
        agent = read_json(kit, "agent.json")
        assert agent["server"] == "server1" and agent["servers"] == SERVERS
        assert agent["relays"] == RELAYS
        config = load_agent_config(kit)
        assert config.servers == tuple(SERVERS)
        assert config.relays == tuple(RelayEndpoint.from_dict(r) for r in RELAYS)
        settings_text = (kit / "local" / "site.yaml").read_text()
        assert "\nconnect: outbound\n" in settings_text
        assert "# proxy: http://user:password@proxy.example:3128" in settings_text and "https_proxy" in settings_text
        assert load_site_settings(kit).connect == "outbound"
        readme = (kit / "startup" / "readme.txt").read_text()
        assert "server1 (server1:8002), server2 (server2:8102)" in readme and "no inbound port" in readme


def test_the_admin_kit_lists_the_relays_and_how_sites_are_reached(ha):
    admin = ha.kits["admin@lead-lab.example"]
    config = read_json(admin, "admin.json")
    assert config["relays"] == RELAYS
    assert config["sites"]["site-2"]["connect"] == "outbound"
    kit = load_caller_kit(admin)
    assert kit.relays == tuple(RelayEndpoint.from_dict(r) for r in RELAYS)
    assert kit.endpoint("site-1").connect == "outbound"


def test_an_added_site_reaches_every_server_kit(tmp_path):
    project_file = tmp_path / "project.yml"
    project_file.write_text(HA_PROJECT.read_text())
    provision(load_project(project_file), tmp_path / "ws")
    project_file.write_text(project_file.read_text().replace(
        "  - name: admin@lead-lab.example",
        "  - name: site-3\n    type: client\n    org: hospital_c\n    connect: listen\n"
        "  - name: admin@lead-lab.example",
    ))
    result = provision(load_project(project_file), tmp_path / "ws", add_sites=["site-3"])
    assert result.issued == ["site-3"]
    for server in SERVERS:
        assert read_json(result.kits[server], "server.json")["sites"]["site-3"]["connect"] == "listen"
    assert read_json(result.kits["site-3"], "agent.json")["servers"] == SERVERS


def project_with(servers: str, clients: str = "- {name: site-1, type: client, org: a}") -> str:
    return textwrap.dedent("""\
        api_version: 3
        name: relays
        participants:
        """) + textwrap.indent(textwrap.dedent(servers) + textwrap.dedent(clients), "  ")


def test_relay_host_is_the_first_host_name_else_default_host_else_the_name(tmp_path):
    text = project_with("""\
        - {name: s1, type: server, org: first_org, host_names: [relay1.example, 10.0.0.1], default_host: d1.example}
        - {name: s2, type: server, org: other_org, default_host: relay2.example, fed_learn_port: 9002}
        - {name: s3, type: server, org: other_org, fed_learn_port: 9003}
        """)
    project = parse_project(text)
    assert [s.relay_host for s in project.servers] == ["relay1.example", "relay2.example", "s3"]
    result = provision(project, tmp_path)
    assert read_json(result.kits["site-1"], "agent.json")["relays"] == [
        {"name": "s1", "host": "relay1.example", "port": 8002},
        {"name": "s2", "host": "relay2.example", "port": 9002},
        {"name": "s3", "host": "s3", "port": 9003},
    ]
    # The root CA belongs to the first server's org, as with one server.
    root = x509.load_pem_x509_certificate((result.kits["s3"] / "startup" / "rootCA.pem").read_bytes())
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "first_org"


@pytest.mark.parametrize("value", ["inbound", "OUTBOUND", "1", "true", "null", "[outbound]"])
def test_a_bad_connect_value_is_refused_naming_file_participant_and_field(tmp_path, capsys, value):
    project_file = tmp_path / "project.yml"
    project_file.write_text(project_with(
        "- {name: s1, type: server, org: o}\n",
        f"- {{name: site-1, type: client, org: a}}\n- {{name: site-2, type: client, org: b, connect: {value}}}\n",
    ))
    with pytest.raises(ProjectError) as excinfo:
        load_project(project_file)
    message = str(excinfo.value)
    assert message.startswith(f"{project_file}: participant 'site-2': connect: must be outbound")
    assert "listen" in message
    assert flare(["provision", "-p", str(project_file), "-w", str(tmp_path / "ws")]) == 2
    assert "participant 'site-2': connect" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_connect_defaults_to_outbound_and_listen_is_kept(tmp_path):
    project = parse_project(project_with(
        "- {name: s1, type: server, org: o}\n",
        "- {name: site-1, type: client, org: a}\n"
        "- {name: site-2, type: client, org: b, connect: listen, agent_port: 9102}\n",
    ))
    assert [c.connect for c in project.clients] == ["outbound", "listen"]
    result = provision(project, tmp_path)
    assert "\nconnect: listen\n" in (result.kits["site-2"] / "local" / "site.yaml").read_text()
    readme = (result.kits["site-2"] / "startup" / "readme.txt").read_text()
    assert "at site-2:9102" in readme and "dials out" not in readme


# ---- the kits' shell scripts ---------------------------------------------------------------


def shellcheck(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    result = subprocess.run([str(BIN / "shellcheck"), "--severity=style", str(script)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("kit, script", [
    ("server1", "start.sh"), ("server2", "stop.sh"), ("site-1", "start.sh"), ("site-1", "stop.sh"),
])
def test_kit_scripts_pass_shellcheck(ha, kit, script):
    shellcheck(ha.kits[kit] / "startup" / script)


def fake_agent_path(tmp_path: Path) -> str:
    """A PATH whose ``flare-agent`` just waits, so start.sh can be run without an agent."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "flare-agent").write_text("#!/bin/sh\nexec sleep 30\n")
    (folder / "flare-agent").chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def run_script(path: Path, env_path: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(path)], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PATH": env_path})


@pytest.mark.parametrize("mode, expected", [
    ("outbound", "dialling out to the relays server1 (server1:8002), server2 (server2:8102)"),
    ("listen", "listening on port 8102"),
])
def test_site_start_sh_says_how_the_agent_is_reached(ha, tmp_path, mode, expected):
    import shutil

    kit = Path(shutil.copytree(ha.kits["site-1"], tmp_path / "site-1"))
    settings = kit / "local" / "site.yaml"
    settings.write_text(settings.read_text().replace("\nconnect: outbound\n", f"\nconnect: {mode}\n"))
    env_path = fake_agent_path(tmp_path)
    started = run_script(kit / "startup" / "start.sh", env_path)
    try:
        assert started.returncode == 0, started.stderr
        assert expected in started.stdout
        assert ("listening" in started.stdout) == (mode == "listen")
    finally:
        stopped = run_script(kit / "startup" / "stop.sh", env_path)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout

"""Mutual TLS and authorization against a real agent process, and its audit log."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flare_provider import __version__
from flare_provider.client import AgentClient, AgentError
from flare_provider.provisioning.certs import Identity, issue_certificate
from flare_provider.provisioning.project import Participant
from flare_provider.wire import agent_pb2, agent_pb2_grpc

START = [sys.executable, "-m", "site_agent.cli", "start"]


def client_with(federation, identity: Identity) -> AgentClient:
    """A client of site-1 trusting the federation's root CA but presenting ``identity``."""
    root_ca = federation.pem(federation.server, "rootCA")
    return AgentClient("site-1", federation.address("site-1"), identity.cert_pem, identity.key_pem, root_ca, timeout=10)


def server_identity(federation) -> Identity:
    return Identity.from_pem(federation.pem(federation.server, "crt"), federation.pem(federation.server, "key"))


def expect_error(code: grpc.StatusCode, call, *args, site="site-1") -> AgentError:
    with pytest.raises(AgentError) as info:
        call(*args)
    assert info.value.code == code, str(info.value)
    assert f"site {site!r}" in str(info.value)
    return info.value


def test_mutual_tls_round_trip(federation, agent):
    with federation.client("site-1") as client:
        status = client.status()
    assert (status.project, status.site, status.org, status.version) == ("transport_test", "site-1", "org_a", __version__)
    assert status.caller == {"name": federation.server, "org": "lead_org", "kind": "server", "role": ""}
    assert status.gpus == [] and status.apps == [] and status.active_tasks == []


def test_certificate_of_another_projects_ca_is_refused_at_the_handshake(federation, other_federation, agent):
    before = len(agent.audit_entries())
    with client_with(federation, server_identity(other_federation)) as client:
        expect_error(grpc.StatusCode.UNAVAILABLE, client.status)
    assert len(agent.audit_entries()) == before, "a refused handshake reaches no handler"


def self_signed(name: str, kind: str, org: str) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
    ])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256())
    )
    return Identity(cert, key)


def test_self_signed_certificate_is_refused(federation, agent):
    impostor = self_signed(federation.server, "server", "lead_org")  # claims to be the server identity
    with client_with(federation, impostor) as client:
        expect_error(grpc.StatusCode.UNAVAILABLE, client.status)


def test_a_caller_without_a_certificate_is_refused(federation, agent):
    channel = grpc.secure_channel(
        federation.address("site-1"),
        grpc.ssl_channel_credentials(root_certificates=federation.pem(federation.server, "rootCA")),
        options=[("grpc.ssl_target_name_override", "site-1")],
    )
    with channel, pytest.raises(grpc.RpcError) as info:
        agent_pb2_grpc.FlareAgentStub(channel).GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_agent_must_prove_it_is_the_site_asked_for(federation, agent):
    """site-1's agent answering where site-2 was expected is refused by the client."""
    identity = server_identity(federation)
    root_ca = federation.pem(federation.server, "rootCA")
    client = AgentClient("site-2", federation.address("site-1"), identity.cert_pem, identity.key_pem, root_ca, timeout=10)
    with client:
        error = expect_error(grpc.StatusCode.UNAVAILABLE, client.status, site="site-2")
    assert "Hostname Verification" in error.details


def test_a_sites_own_certificate_may_not_submit(federation, agent):
    with federation.client("site-1", caller="site-1") as client:
        error = expect_error(grpc.StatusCode.PERMISSION_DENIED, client.submit_task, "t-own", "digits", b"", 0)
    assert "site-1" in error.details and "sites may not call" in error.details
    with federation.client("site-1", caller="site-2") as client:
        expect_error(grpc.StatusCode.PERMISSION_DENIED, client.status)
    assert not agent.task_dir("t-own").exists()


def test_a_server_certificate_with_another_name_is_refused(federation, agent):
    state = federation.state_dir
    root = Identity.from_pem((state / "rootCA.pem").read_bytes(), (state / "rootCA.key").read_bytes())
    impostor = issue_certificate(root, Participant(name="other-server", type="server", org="lead_org"))
    with client_with(federation, impostor) as client:
        error = expect_error(grpc.StatusCode.PERMISSION_DENIED, client.get_task, "t1")
    assert "not this federation's server identity" in error.details


def test_member_reads_status_but_may_not_abort_or_shut_down(federation, agent):
    with federation.client("site-1", caller="viewer@org_a") as client:
        assert client.status().caller["role"] == "member"
        expect_error(grpc.StatusCode.PERMISSION_DENIED, client.abort, "t1")
        expect_error(grpc.StatusCode.PERMISSION_DENIED, client.shutdown)
        expect_error(grpc.StatusCode.PERMISSION_DENIED, client.get_task, "t1")
        expect_error(grpc.StatusCode.PERMISSION_DENIED, client.deploy_app, b"bundle")
    assert agent.alive


def test_org_scoped_admins_abort_only_on_their_own_orgs_sites(federation, agent):
    # Authorized callers get past the check and find no such task.
    with federation.client("site-1", caller="it@org_a") as client:
        expect_error(grpc.StatusCode.NOT_FOUND, client.abort, "no-such-task")
        expect_error(grpc.StatusCode.PERMISSION_DENIED, client.shutdown)
    with federation.client("site-1", caller="chief@org_b") as client:
        error = expect_error(grpc.StatusCode.PERMISSION_DENIED, client.abort, "no-such-task")
    assert "org 'org_b'" in error.details
    with federation.client("site-1", caller="boss@lead") as client:
        expect_error(grpc.StatusCode.NOT_FOUND, client.abort, "no-such-task")


def test_the_server_identity_may_not_shut_an_agent_down(federation, agent):
    with federation.client("site-1") as client:
        expect_error(grpc.StatusCode.PERMISSION_DENIED, client.shutdown)
        expect_error(grpc.StatusCode.NOT_FOUND, client.get_task, "no-such-task")


def test_project_admin_shuts_the_agent_down(federation, agent):
    with federation.client("site-1", caller="boss@lead") as client:
        client.shutdown("maintenance window")
    assert agent.wait_exit() == 0
    assert "Shutdown requested by boss@lead: maintenance window" in agent.log_path.read_text()
    entry = agent.audit_entries()[-1]
    assert (entry["method"], entry["outcome"], entry["reason"]) == ("Shutdown", "ok", "maintenance window")
    assert (entry["who"]["name"], entry["who"]["kind"], entry["who"]["role"]) == ("boss@lead", "admin", "project_admin")
    agent.start()


def test_audit_log_records_who_did_what(federation, agent):
    before = len(agent.audit_entries())
    with federation.client("site-1", caller="viewer@org_a") as client:
        expect_error(grpc.StatusCode.PERMISSION_DENIED, client.abort, "audited-task")
    with federation.client("site-1", caller="it@org_a") as client:
        expect_error(grpc.StatusCode.NOT_FOUND, client.abort, "audited-task")
    with federation.client("site-1") as client:
        client.status()
    with federation.client("site-1", caller="site-1") as client:
        expect_error(grpc.StatusCode.PERMISSION_DENIED, client.submit_task, "audited-task", "digits", b"", 1)

    entries = agent.audit_entries()[before:]
    summary = [(e["who"]["name"], e["method"], e.get("task_id"), e["outcome"]) for e in entries]
    assert summary == [
        ("viewer@org_a", "AbortTask", "audited-task", "denied"),
        ("it@org_a", "AbortTask", "audited-task", "NOT_FOUND"),
        (federation.server, "GetStatus", None, "ok"),
        ("site-1", "SubmitTask", None, "denied"),  # refused before its stream was read
    ]
    assert entries[0]["who"] == {"name": "viewer@org_a", "org": "org_a", "kind": "admin", "role": "member", "peer": entries[0]["who"]["peer"]}
    assert entries[0]["detail"] == "admin role 'member' may not abort"
    assert "no task 'audited-task'" in entries[1]["detail"]
    assert entries[3]["who"]["kind"] == "client"
    assert all(e["time"].endswith("+00:00") and e["who"]["peer"].startswith("ipv4:127.0.0.1:") for e in entries)
    everything = (agent.work_dir / "audit.jsonl").read_text() + agent.log_path.read_text()
    assert "PRIVATE KEY" not in everything


def test_sigterm_stops_the_agent_cleanly(agent):
    assert agent.stop() == 0
    assert "agent of site site-1 stopped" in agent.log_path.read_text()
    agent.start()


def copy_kit(federation, tmp_path, site="site-2"):
    kit = tmp_path / site
    shutil.copytree(federation.kits[site], kit)
    return kit


def run_agent(kit, *args, timeout=60):
    return subprocess.run([*START, "--kit", str(kit), *args], capture_output=True, text=True, timeout=timeout)


def test_a_tampered_kit_does_not_start_and_names_each_bad_file(federation, tmp_path):
    kit = copy_kit(federation, tmp_path)
    config = kit / "startup" / "agent.json"
    config.write_text(config.read_text().replace('"org_b"', '"org_a"'))  # claim another org
    (kit / "startup" / "stop.sh").unlink()
    (kit / "startup" / "extra.pem").write_text("planted")
    result = run_agent(kit, "--host", "127.0.0.1", "--port", "0")
    assert result.returncode == 2
    assert "refusing to start" in result.stderr
    for problem in ("changed file: agent.json", "missing file: stop.sh", "added file: extra.pem"):
        assert problem in result.stderr
    assert not (kit / "work").exists(), "nothing may run from an unverified kit"


def test_a_kit_from_another_root_is_refused_when_the_root_is_pinned(federation, other_federation, tmp_path):
    kit = copy_kit(other_federation, tmp_path)
    pinned = json.loads((federation.server_kit / "startup" / "server.json").read_text())["root_fingerprint"]
    result = run_agent(kit, "--port", "0", "--root-fingerprint", pinned)
    assert result.returncode == 2 and "rootCA.pem is not the project's root CA" in result.stderr


def test_bad_site_settings_stop_the_agent_with_the_field_named(federation, tmp_path):
    kit = copy_kit(federation, tmp_path)
    (kit / "local" / "site.yaml").write_text("data_dir: data\nwork_dir: work\ngpus: lots\n")
    result = run_agent(kit, "--host", "127.0.0.1", "--port", "0")
    assert result.returncode == 2 and "site.yaml" in result.stderr and "'gpus'" in result.stderr


def test_a_port_in_use_is_a_clear_error(federation, agent, tmp_path):
    kit = copy_kit(federation, tmp_path, "site-1")
    result = run_agent(kit, "--host", "127.0.0.1", "--port", str(agent.port))
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{agent.port}" in result.stderr
    assert agent.alive


def test_a_second_agent_on_the_same_work_folder_is_refused(federation, agent):
    before = {p.name: p.stat().st_mtime_ns for p in agent.work_dir.rglob("*") if p.is_file() and p.name != "audit.jsonl"}
    result = run_agent(agent.kit, "--host", "127.0.0.1", "--port", "0")
    assert result.returncode == 2 and "in use by another agent" in result.stderr
    after = {p.name: p.stat().st_mtime_ns for p in agent.work_dir.rglob("*") if p.is_file() and p.name != "audit.jsonl"}
    assert after == before, "the refused agent touched the running one's files"
    assert agent.alive


def test_agent_process_helper_reports_a_failed_start(make_agent):
    """The fixture's own wait must fail at once, not hang, when an agent cannot start."""
    with pytest.raises(RuntimeError, match="exited with 2"):
        make_agent("site-2", "--max-weights-bytes", "lots").start()

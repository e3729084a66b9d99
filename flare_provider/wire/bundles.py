"""App bundles: an app folder as one zip, signed by the federation's server identity.

An app is a folder with ``app.yaml`` (its name and trainer) and, optionally, Python
code under ``custom/``. The Airflow side builds a bundle; each agent verifies it
before anything is unpacked. Inside the zip::

    MANIFEST.json    {"format", "name", "version", "files": {path: sha256}}
    SIGNATURE.json   {"format", "signature": ECDSA-SHA256 over MANIFEST.json, "signer_cert": PEM}
    app/<path>       the app's files

The version is a hash of the file list and contents only, so building the same
folder twice gives the same version (the signature differs: ECDSA is randomized).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ..provisioning.certs import Identity, describe_certificate
from ..safezip import ENTRY_READ_ERRORS, OPEN_ERRORS, ZipMember, safe_members
from .app_config import (
    APP_CONFIG,
    APP_NAME_RE,
    CUSTOM_DIR,
    AppConfig,
    BundleError,
    load_app_config,
    parse_app_config,
    trainer_is_custom,
)

MANIFEST_FILE = "MANIFEST.json"
SIGNATURE_FILE = "SIGNATURE.json"
APP_PREFIX = "app"
DEFAULT_MAX_BUNDLE_BYTES = 256 << 20

_MANIFEST_FORMAT = "flare-app-bundle/1"
_SIGNATURE_FORMAT = "flare-app-signature/1"
# \Z, not $: "$" also matches before a final newline, which must not reach a folder or module name.
_VERSION_RE = re.compile(r"^[0-9a-f]{64}\Z")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same folder zips to the same entries


@dataclass(frozen=True)
class BundleManifest:
    """What a bundle holds: app name, version (content hash) and each file's SHA-256."""

    name: str
    version: str
    files: dict[str, str]

    @property
    def has_custom_code(self) -> bool:
        """Anything under ``custom/`` counts: that folder goes onto the worker's import path."""
        return any(PurePosixPath(rel).parts[:1] == (CUSTOM_DIR,) for rel in self.files)


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature, signer and file hashes all checked out."""

    manifest: BundleManifest
    config: AppConfig
    members: list[ZipMember]  # the app's files, entries under app/
    signer: str


# ---- building --------------------------------------------------------------------


def content_hash(files: dict[str, str]) -> str:
    """The app version: SHA-256 over the sorted (path, file hash) list."""
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def app_files(app_dir: Path) -> dict[str, Path]:
    """The files a bundle carries: everything but caches and hidden files; links refused."""
    found = {}
    for path in sorted(app_dir.rglob("*")):
        rel = path.relative_to(app_dir)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts) or path.suffix == ".pyc":
            continue
        if path.is_symlink():
            raise BundleError(f"{path}: links cannot go into an app bundle; copy the file instead")
        if path.is_file():
            found[rel.as_posix()] = path
    return found


def build_bundle(app_dir: Path, signer_cert_pem: bytes, signer_key_pem: bytes) -> bytes:
    """Zip ``app_dir`` with a manifest signed by the given identity (the federation's server).

    Raises :class:`BundleError` when the folder is not an app or the key does not
    match the certificate. The key is used for signing only and appears nowhere.
    """
    app_dir = Path(app_dir)
    if not app_dir.is_dir():
        raise BundleError(f"{app_dir}: not an app folder")
    config = load_app_config(app_dir)
    try:
        signer = Identity.from_pem(signer_cert_pem, signer_key_pem)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"cannot sign the bundle: unusable signer certificate or key ({exc})") from None
    paths = app_files(app_dir)
    contents = {rel: path.read_bytes() for rel, path in paths.items()}
    files = {rel: hashlib.sha256(data).hexdigest() for rel, data in contents.items()}
    trainer_is_custom(config, files)  # refuse a bundle no agent could run
    manifest = {"format": _MANIFEST_FORMAT, "name": config.name, "version": content_hash(files), "files": files}
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    signature = signer.key.sign(manifest_bytes, ec.ECDSA(hashes.SHA256()))
    signature_doc = {
        "format": _SIGNATURE_FORMAT,
        "signature": base64.b64encode(signature).decode(),
        "signer_cert": signer.cert_pem.decode(),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        _add(zf, MANIFEST_FILE, manifest_bytes)
        _add(zf, SIGNATURE_FILE, json.dumps(signature_doc, indent=2, sort_keys=True).encode())
        for rel, data in contents.items():
            _add(zf, f"{APP_PREFIX}/{rel}", data)
    return buf.getvalue()


def _add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, _ZIP_EPOCH)
    info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data)


# ---- reading and verifying -------------------------------------------------------


def _parse_manifest(data: bytes, source: str) -> BundleManifest:
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != _MANIFEST_FORMAT:
            raise ValueError("unknown format")
        name, version, files = doc["name"], doc["version"], doc["files"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise BundleError(f"{source}: {MANIFEST_FILE} is malformed ({exc})") from None
    if not isinstance(name, str) or not APP_NAME_RE.match(name):
        raise BundleError(f"{source}: {MANIFEST_FILE} has an invalid app name {name!r}")
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _VERSION_RE.match(v) for k, v in files.items()
    ):
        raise BundleError(f"{source}: {MANIFEST_FILE} has a malformed file list")
    if not isinstance(version, str) or version != content_hash(files):
        raise BundleError(f"{source}: {MANIFEST_FILE} version does not match its file list")
    return BundleManifest(name=name, version=version, files=dict(files))


def _open_zip(data: bytes | Path, source: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data)
    except OPEN_ERRORS as exc:
        raise BundleError(f"{source}: not an app bundle (not a readable zip: {exc})") from None


def _read_entry(zf: zipfile.ZipFile, name: str, source: str, limit: int = 16 << 20) -> bytes:
    try:
        info = zf.getinfo(name)
    except KeyError:
        what = "unsigned" if name == SIGNATURE_FILE else "not an app bundle"
        raise BundleError(f"{source}: {what}: {name} is missing") from None
    if info.file_size > limit:
        raise BundleError(f"{source}: {name} is implausibly large")
    try:
        return zf.read(info)
    except ENTRY_READ_ERRORS as exc:
        raise BundleError(f"{source}: {name} is damaged: {exc}") from None


def read_bundle_manifest(bundle: bytes) -> BundleManifest:
    """The manifest of a bundle (name, version, files), without checking its signature."""
    with _open_zip(bundle, "bundle") as zf:
        return _parse_manifest(_read_entry(zf, MANIFEST_FILE, "bundle"), "bundle")


def server_name_set(server_names: str | Iterable[str]) -> frozenset[str]:
    """The server participants' names: one name, or any collection of them."""
    return frozenset({server_names} if isinstance(server_names, str) else server_names)


def _check_signer(signer_pem: str, root_ca_pem: bytes, server_names: frozenset[str], source: str) -> x509.Certificate:
    """The signer's certificate, if the project's root CA issued it to one of the server identities."""
    try:
        cert = x509.load_pem_x509_certificate(signer_pem.encode())
    except (ValueError, AttributeError) as exc:
        raise BundleError(f"{source}: the signer certificate cannot be read ({exc})") from None
    root = x509.load_pem_x509_certificate(root_ca_pem)
    try:
        if cert.issuer != root.subject:
            raise ValueError("issuer differs")
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise BundleError(f"{source}: signed by a certificate that this project's root CA did not issue") from None
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise BundleError(f"{source}: the signer certificate is not valid now (expired or not yet valid)")
    peer = describe_certificate(cert)
    if peer.kind != "server" or peer.name not in server_names:
        names = ", ".join(repr(n) for n in sorted(server_names))
        raise BundleError(
            f"{source}: signed by {peer.name!r} ({peer.kind or 'unknown kind'}), "
            f"not by a server identity of the federation ({names})"
        )
    return cert


def _sha256(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> str:
    h = hashlib.sha256()
    try:
        with zf.open(info) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except ENTRY_READ_ERRORS as exc:
        raise BundleError(f"{source}: entry {info.filename!r} is damaged: {exc}") from None
    return h.hexdigest()


def verify_bundle(
    zf: zipfile.ZipFile,
    root_ca_pem: bytes,
    server_names: str | Iterable[str],
    source: str = "bundle",
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
) -> VerifiedBundle:
    """Check everything about an open bundle before any of it is unpacked.

    The signer certificate must be issued by ``root_ca_pem`` to one of the server
    identities ``server_names`` (a name or a collection) and its signature over the
    manifest must hold; every entry must be safe to unpack (see
    :mod:`flare_provider.safezip`), listed in the manifest, with the listed hash;
    ``app.yaml`` must name the same app and a trainer an agent can run.
    """
    manifest_bytes = _read_entry(zf, MANIFEST_FILE, source)
    try:
        sig_doc = json.loads(_read_entry(zf, SIGNATURE_FILE, source))
        if sig_doc.get("format") != _SIGNATURE_FORMAT:
            raise ValueError("unknown format")
        signature = base64.b64decode(sig_doc["signature"], validate=True)
        signer_pem = sig_doc["signer_cert"]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise BundleError(f"{source}: {SIGNATURE_FILE} is malformed ({exc})") from None
    cert = _check_signer(signer_pem, root_ca_pem, server_name_set(server_names), source)
    try:
        public_key = cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        public_key.verify(signature, manifest_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BundleError(f"{source}: the signature does not match the manifest (altered after signing)") from None
    manifest = _parse_manifest(manifest_bytes, source)

    members = [
        m for m in safe_members(zf, source, max_bytes, BundleError) if str(m.path) not in (MANIFEST_FILE, SIGNATURE_FILE)
    ]
    present: dict[str, ZipMember] = {}
    for member in members:
        parts = member.path.parts
        if parts[0] != APP_PREFIX or len(parts) < 2:
            raise BundleError(f"{source}: unexpected entry {member.info.filename!r} outside {APP_PREFIX}/")
        present[PurePosixPath(*parts[1:]).as_posix()] = member
    missing = sorted(set(manifest.files) - set(present))
    added = sorted(set(present) - set(manifest.files))
    if missing or added:
        raise BundleError(f"{source}: files differ from the signed manifest (missing {missing}, not listed {added})")
    for rel, member in present.items():
        if _sha256(zf, member.info, source) != manifest.files[rel]:
            raise BundleError(f"{source}: file {rel!r} was changed after signing (hash mismatch)")
    if APP_CONFIG not in present:
        raise BundleError(f"{source}: the app has no {APP_CONFIG}")
    config = parse_app_config(zf.read(present[APP_CONFIG].info).decode("utf-8", "replace"), f"{source}: {APP_CONFIG}")
    if config.name != manifest.name:
        raise BundleError(f"{source}: {APP_CONFIG} names app {config.name!r} but the manifest says {manifest.name!r}")
    try:
        trainer_is_custom(config, manifest.files)
    except BundleError as exc:
        raise BundleError(f"{source}: {exc}") from None
    return VerifiedBundle(manifest=manifest, config=config, members=members, signer=describe_certificate(cert).name)


def open_bundle(path: Path, source: str | None = None) -> zipfile.ZipFile:
    """Open a bundle file for :func:`verify_bundle`; a clear error if it is not a zip."""
    return _open_zip(Path(path), source or str(path))

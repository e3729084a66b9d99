"""Signing a kit's ``startup/`` folder with the root CA key, and checking it.

``signature.json`` lists every other file of the folder with its SHA-256 and carries
one ECDSA signature over that list, so a changed, missing or added file is caught.
The check trusts the ``rootCA.pem`` in the folder unless a pinned root fingerprint is
given (the one provisioning prints), which also catches a kit re-signed by another CA.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ..files import file_digest
from .certs import Identity, fingerprint

SIGNATURE_FILE = "signature.json"
ROOT_CA_FILE = "rootCA.pem"
_FORMAT = "flare-kit-signature/1"


class KitVerificationError(Exception):
    """A kit that must not be trusted; ``problems`` lists each reason."""

    def __init__(self, folder: Path, problems: list[str]):
        self.folder = folder
        self.problems = problems
        super().__init__(f"startup kit {folder} failed verification: " + "; ".join(problems))


@dataclass
class VerifyReport:
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.added or self.errors)

    def problems(self) -> list[str]:
        return (
            self.errors
            + [f"changed file: {p}" for p in self.changed]
            + [f"missing file: {p}" for p in self.missing]
            + [f"added file: {p}" for p in self.added]
        )


def _digest(path: Path) -> str:
    return file_digest(path)[0]


def _walk(folder: Path) -> dict[str, Path]:
    """Every entry below ``folder`` except the signature; links are reported, not followed."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel == SIGNATURE_FILE or (path.is_dir() and not path.is_symlink()):
            continue
        found[rel] = path
    return found


def _canonical(files: dict[str, str], signer: str) -> bytes:
    return json.dumps({"format": _FORMAT, "signer": signer, "files": files}, sort_keys=True).encode()


def sign_folder(folder: Path, root: Identity) -> None:
    files = {rel: _digest(path) for rel, path in _walk(folder).items()}
    signer = root.fingerprint
    signature = root.key.sign(_canonical(files, signer), ec.ECDSA(hashes.SHA256()))
    doc = {
        "format": _FORMAT,
        "signer": signer,
        "files": files,
        "signature": base64.b64encode(signature).decode(),
    }
    (folder / SIGNATURE_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def verify_folder(folder: str | Path, root_fingerprint: str | None = None) -> VerifyReport:
    """Check ``folder`` (a kit's ``startup/``) against its ``signature.json``."""
    folder = Path(folder)
    report = VerifyReport()
    sig_path = folder / SIGNATURE_FILE
    if not folder.is_dir():
        report.errors.append(f"{folder} is not a folder")
        return report
    try:
        doc = json.loads(sig_path.read_text())
        files = doc["files"]
        signer = doc["signer"]
        signature = base64.b64decode(doc["signature"], validate=True)
        if doc.get("format") != _FORMAT or not isinstance(files, dict):
            raise ValueError("unknown format")
    except FileNotFoundError:
        report.errors.append(f"missing file: {SIGNATURE_FILE}")
        return report
    except (ValueError, KeyError, TypeError) as exc:
        report.errors.append(f"{SIGNATURE_FILE} is malformed ({exc})")
        return report

    try:
        root_cert = x509.load_pem_x509_certificate((folder / ROOT_CA_FILE).read_bytes())
    except (OSError, ValueError) as exc:
        report.errors.append(f"cannot read {ROOT_CA_FILE}: {exc}")
        return report
    root_fp = fingerprint(root_cert)
    if root_fingerprint and root_fp != root_fingerprint.lower().replace(":", ""):
        report.errors.append(f"{ROOT_CA_FILE} is not the project's root CA (fingerprint {root_fp})")
    if signer != root_fp:
        report.errors.append(f"signed by another key (signer {signer}), not by {ROOT_CA_FILE}")
    try:
        public_key = root_cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        public_key.verify(signature, _canonical(files, signer), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        report.errors.append(f"{SIGNATURE_FILE} has an invalid signature")

    present = _walk(folder)
    for rel, expected in sorted(files.items()):
        path = present.get(rel)
        if path is None:
            report.missing.append(rel)
        elif path.is_symlink() or not path.is_file() or _digest(path) != expected:
            report.changed.append(rel)
    report.added.extend(rel for rel in present if rel not in files)
    return report


def require_valid(folder: str | Path, root_fingerprint: str | None = None) -> None:
    """Raise :class:`KitVerificationError` unless ``folder`` verifies."""
    report = verify_folder(folder, root_fingerprint)
    if not report.ok:
        raise KitVerificationError(Path(folder), report.problems())

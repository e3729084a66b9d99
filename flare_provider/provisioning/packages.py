"""Kit packages: the zip beside each kit folder, optionally password-protected.

A protected package is the zip encrypted with AES-256-GCM under a key derived from the
password with scrypt; the header (magic, KDF parameters, salt, nonce) is authenticated
too, so a wrong password and a damaged file are both refused before anything is written.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import stat
import struct
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..safezip import OPEN_ERRORS, ZipMember, extract_members, safe_members

MAGIC = b"FLAREKIT"
_VERSION = 1
_HEADER = struct.Struct(">8sBBBB16s12s")  # magic, version, log2(n), r, p, salt, nonce
_SCRYPT = (15, 8, 1)  # n = 2**15: about 0.1 s and 32 MiB per attempt
# What a package's header may ask of the key derivation: scrypt takes 128 * r * n bytes and
# time in proportion to n * r * p, so a header may not make opening it cost more than 8 times
# this version's memory (256 MiB) and 16 times its work.
_MAX_SCRYPT_MEMORY = 128 * 8 * (1 << 15) * 8
_MAX_SCRYPT_WORK = 8 * (1 << 15) * 16
ENCRYPTED_SUFFIX = ".zip.enc"
MAX_UNPACKED_BYTES = 256 << 20  # a kit is a few KiB; anything near this is not a kit


class PackageError(Exception):
    """A package that cannot be opened; nothing was written."""


def zip_folder(folder: Path) -> bytes:
    """The folder as zip bytes, entries under ``<folder name>/`` with their permissions."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            arcname = (PurePosixPath(folder.name) / path.relative_to(folder).as_posix()).as_posix()
            info = zipfile.ZipInfo.from_file(path, arcname)
            info.external_attr = (stat.S_IFREG | stat.S_IMODE(path.stat().st_mode)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def generate_password() -> str:
    return secrets.token_urlsafe(12)


def _derive_key(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    try:  # a password from a command line or the environment may carry undecodable bytes
        secret = password.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise PackageError("the password holds characters that cannot be encoded (lone surrogates)") from None
    return Scrypt(salt=salt, length=32, n=1 << log_n, r=r, p=p).derive(secret)


def encrypt(data: bytes, password: str) -> bytes:
    if not password:
        raise ValueError("an empty password cannot protect a package")
    salt, nonce = os.urandom(16), os.urandom(12)
    header = _HEADER.pack(MAGIC, _VERSION, *_SCRYPT, salt, nonce)
    key = _derive_key(password, salt, *_SCRYPT)
    return header + AESGCM(key).encrypt(nonce, data, header)


def is_encrypted(blob: bytes) -> bool:
    return blob[: len(MAGIC)] == MAGIC


def decrypt(blob: bytes, password: str, source: str = "package") -> bytes:
    if len(blob) < _HEADER.size or not is_encrypted(blob):
        raise PackageError(f"{source}: not a protected kit package")
    magic, version, log_n, r, p, salt, nonce = _HEADER.unpack_from(blob)
    if version != _VERSION or not (10 <= log_n <= 22 and 1 <= r <= 32 and 1 <= p <= 16):
        raise PackageError(f"{source}: unsupported package version or parameters")
    if 128 * r * (1 << log_n) > _MAX_SCRYPT_MEMORY or r * p * (1 << log_n) > _MAX_SCRYPT_WORK:
        raise PackageError(f"{source}: its key derivation parameters would take too much memory or time")
    try:
        key = _derive_key(password, salt, log_n, r, p)
    except PackageError as exc:
        raise PackageError(f"{source}: {exc}") from None
    try:
        return AESGCM(key).decrypt(nonce, blob[_HEADER.size :], blob[: _HEADER.size])
    except InvalidTag:
        raise PackageError(f"{source}: wrong password, or the package is damaged") from None


def _kit_members(zf: zipfile.ZipFile, source: str) -> list[ZipMember]:
    members = safe_members(zf, source, MAX_UNPACKED_BYTES, PackageError)
    tops = {m.path.parts[0] for m in members}
    if len(tops) != 1 or any(len(m.path.parts) < 2 for m in members):
        raise PackageError(f"{source}: a kit package holds exactly one participant folder, found {sorted(tops)}")
    return members


def unpack(package: str | Path, dest: str | Path, password: str | None = None) -> Path:
    """Open a kit package (plain zip or protected) into ``dest``; returns the kit folder.

    Nothing is written unless the whole package opens: it is extracted into a temporary
    folder beside the target and renamed into place.
    """
    package, dest = Path(package), Path(dest)
    try:
        blob = package.read_bytes()
    except OSError as exc:
        raise PackageError(f"{package}: cannot read: {exc}") from exc
    if is_encrypted(blob):
        if password is None:
            raise PackageError(f"{package}: this package is protected; a password is needed")
        blob = decrypt(blob, password, str(package))
    try:
        zf = zipfile.ZipFile(io.BytesIO(blob))
    except OPEN_ERRORS:
        raise PackageError(f"{package}: not a zip file or a protected kit package") from None
    with zf:
        members = _kit_members(zf, str(package))
        top = members[0].path.parts[0]
        target = dest / top
        if target.exists():
            raise PackageError(f"{target} already exists; remove it or unpack elsewhere")
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{top}.", dir=dest))
        try:
            extract_members(zf, members, staging, str(package), PackageError)
            (staging / top).rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target

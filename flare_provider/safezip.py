"""Opening zip archives that came from elsewhere without letting them write outside a folder.

Kit packages and app bundles both use these checks: no absolute paths, no ``..``, no
links or special files, no entry twice, and a bound on the unpacked size (entries are
never read past their declared size, so the bound holds for the bytes written too).
"""

from __future__ import annotations

import lzma
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# What reading a damaged or unusual entry raises: a bad header or CRC, an entry placed before
# the archive's start (a negative seek), a broken compressed stream (each decompressor has its
# own error), a method zipfile lacks, an encrypted entry.
ENTRY_READ_ERRORS = (
    zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, NotImplementedError, RuntimeError
)
# What opening bytes that are no zip raises, beyond BadZipFile (found by fuzzing: bad offsets, sizes).
OPEN_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError)


class UnsafeArchiveError(ValueError):
    """An archive entry that must not be unpacked."""


@dataclass(frozen=True)
class ZipMember:
    """One regular file of an archive, with its checked relative path."""

    info: zipfile.ZipInfo
    path: PurePosixPath
    mode: int  # permission bits only


def safe_members(
    zf: zipfile.ZipFile,
    source: str,
    max_bytes: int,
    error: type[Exception] = UnsafeArchiveError,
) -> list[ZipMember]:
    """The archive's files, in archive order, after checking every entry.

    Raises ``error`` (with ``source`` in its message) for the first entry that could
    escape the target folder, is a link or special file, repeats another entry, or
    makes the archive unpack to more than ``max_bytes``. Folder entries are skipped.
    """
    members: list[ZipMember] = []
    seen: set[PurePosixPath] = set()
    total = 0
    for info in zf.infolist():
        name = PurePosixPath(info.filename)
        mode = info.external_attr >> 16
        if info.filename.endswith("/"):  # a folder (ZipInfo.is_dir fails on an empty name)
            continue
        if name.is_absolute() or ".." in name.parts or "\\" in info.filename or not name.parts:
            raise error(f"{source}: entry {info.filename!r} would be written outside the target folder")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # zips written without a type carry 0
            raise error(f"{source}: entry {info.filename!r} is a link or special file")
        if name in seen:
            raise error(f"{source}: entry {info.filename!r} appears more than once")
        seen.add(name)
        total += info.file_size
        if total > max_bytes:
            raise error(f"{source}: unpacks to more than {max_bytes} bytes")
        members.append(ZipMember(info, name, (mode & 0o777) or 0o644))
    return members


def extract_members(
    zf: zipfile.ZipFile,
    members: list[ZipMember],
    dest: Path,
    source: str,
    error: type[Exception] = UnsafeArchiveError,
    strip: str | None = None,
) -> None:
    """Write ``members`` (from :func:`safe_members`) below ``dest``, a fresh folder.

    With ``strip``, each member's leading folder ``strip`` is left out of its path.
    Callers extract into a staging folder and rename it into place, so a failure
    here leaves nothing visible behind.
    """
    for member in members:
        parts = member.path.parts
        if strip is not None:
            if parts[0] != strip or len(parts) < 2:
                raise error(f"{source}: entry {member.info.filename!r} is not inside {strip}/")
            parts = parts[1:]
        out = Path(dest).joinpath(*parts)
        try:
            data = zf.read(member.info)
        except ENTRY_READ_ERRORS as exc:
            raise error(f"{source}: entry {member.info.filename!r} is damaged: {exc}") from None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, member.mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(out, member.mode)
        except OSError as exc:
            raise error(f"{source}: cannot write entry {member.info.filename!r}: {exc.strerror}") from None

"""Local file helpers shared by every part: streamed SHA-256, atomic writes, safe names.

An atomic write goes to a temporary file beside the target and is renamed over it only
when complete, so a reader (or a process restarted after a crash) sees the old file or
the whole new one, never a part.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(name: str) -> str:
    """``name`` with anything but letters, digits, '.', '_' and '-' replaced: for task ids, file and socket names."""
    return _UNSAFE.sub("_", name)


def file_digest(path: str | Path) -> tuple[str, int]:
    """SHA-256 (hex) and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


@contextmanager
def atomic_file(path: str | Path, mode: int = 0o644, durable: bool = True) -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary file beside it, renamed into place only on success.

    ``durable`` also flushes the data and the rename to disk, so it survives a power
    cut and not only a crash of the process.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """``data`` to ``path`` with :func:`atomic_file`."""
    with atomic_file(path, mode, durable) as f:
        f.write(data)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable, so a later file cannot outlive an earlier one in a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

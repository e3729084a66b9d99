"""``file:///path`` snapshots: a folder on a local or mounted file system."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..files import CHUNK_BYTES, atomic_file, file_digest, fsync_dir
from .backend import Backend
from .errors import SnapshotError


def path_from_file_uri(uri: str) -> Path:
    """``file:///some/path`` -> ``/some/path``."""
    parts = urlparse(uri)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path:
        raise ValueError(f"a file URI names a local absolute path (file:///path), got {uri!r}")
    return Path(unquote(parts.path))


class LocalBackend(Backend):
    adopts_in_place = True

    def __init__(self, root: Path):
        if not root.is_absolute():
            raise ValueError(f"a file snapshot store needs an absolute path, got {str(root)!r}")
        self.root = root

    def uri(self, key: str = "") -> str:
        return (self.root / key).as_uri() if key else self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/")) if key else self.root

    def put_file(self, key: str, path: Path, sha256: str) -> str:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "rb") as src, atomic_file(target) as out:
                shutil.copyfileobj(src, out, CHUNK_BYTES)
            return _tag(target.stat())
        except OSError as exc:
            raise SnapshotError(f"{self.uri(key)}: cannot write: {exc.strerror or exc}") from None

    def staging_dir(self, folder: str) -> Path | None:
        # In the store's own folder, so that adopting a file is a rename on one file system
        # (the scratch folder is hidden: listings skip names that start with a dot).
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SnapshotError(f"{self.uri()}: cannot write: {exc.strerror or exc}") from None
        return self.root

    def adopt_file(self, key: str, path: Path, sha256: str) -> str:
        """Moved into place (flushed to disk first) rather than copied; copied where a rename cannot do it."""
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(path, 0o644)
            os.replace(path, target)
        except OSError:
            return self.put_file(key, path, sha256)  # another file system, say: put_file says what fails
        try:
            fsync_dir(target.parent)
            return _tag(target.stat())
        except OSError as exc:
            raise SnapshotError(f"{self.uri(key)}: cannot write: {exc.strerror or exc}") from None

    def put_bytes(self, key: str, data: bytes, durable: bool = True) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(target, durable=durable) as out:
                out.write(data)
        except OSError as exc:
            raise SnapshotError(f"{self.uri(key)}: cannot write: {exc.strerror or exc}") from None

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotError(f"{self.uri(key)}: cannot read: {exc.strerror or exc}") from None

    def download(self, key: str, dest: Path) -> tuple[str, int] | None:
        digest, size = hashlib.sha256(), 0
        try:
            with open(self._path(key), "rb") as src, open(dest, "wb") as out:
                while chunk := src.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotError(f"{self.uri(key)}: cannot copy to {dest}: {exc.strerror or exc}") from None
        return digest.hexdigest(), size

    def stat(self, key: str) -> tuple[int, str | None] | None:
        try:
            info = self._path(key).stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotError(f"{self.uri(key)}: cannot read: {exc.strerror or exc}") from None
        return info.st_size, _tag(info)

    def digest(self, key: str) -> tuple[str, int] | None:
        try:
            return file_digest(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotError(f"{self.uri(key)}: cannot read: {exc.strerror or exc}") from None

    def list_folders(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        try:
            return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SnapshotError(f"{self.uri(prefix)}: cannot list: {exc.strerror or exc}") from None

    def list_keys(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        try:
            return sorted(
                p.relative_to(folder).as_posix()
                for p in folder.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            )
        except OSError as exc:
            raise SnapshotError(f"{self.uri(prefix)}: cannot list: {exc.strerror or exc}") from None

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


def _tag(info: os.stat_result) -> str:
    # A file replaced has a new inode; one rewritten in place a new modification and change
    # time (which no one can set back). A copied store has new ones all over, so its rounds
    # are checked by their SHA-256 instead: slower, never wrong.
    return f"{info.st_ino}:{info.st_mtime_ns}:{info.st_ctime_ns}"

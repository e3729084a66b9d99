"""Where snapshot files live: the operations the store needs from a file system or a bucket.

Keys are '/'-separated paths relative to the store's root. Every write replaces a whole
object or file at once; none is ever visible half-written.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

from .errors import SnapshotError
from .model_files import HashedTensors, read_hashed


class Backend(ABC):
    # True where adopt_file moves the file itself into the store, flushed to disk there (a
    # local store): whoever writes a file to adopt has its bytes go to disk as it writes.
    adopts_in_place = False

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """The URI of ``key`` (the root without one)."""

    @abstractmethod
    def put_file(self, key: str, path: Path, sha256: str) -> str:
        """Store the local file ``path`` (whose SHA-256 is ``sha256``) under ``key``, streaming it.

        Returns the stored file's tag (see :meth:`stat`).
        """

    def staging_dir(self, folder: str) -> Path | None:
        """Where to write files that :meth:`adopt_file` will store under ``folder`` at least
        cost; None: anywhere (the system's temporary folder)."""
        return None

    def adopt_file(self, key: str, path: Path, sha256: str) -> str:
        """As :meth:`put_file`, for a file the caller gives up: it may be moved, not copied."""
        return self.put_file(key, path, sha256)

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, durable: bool = True) -> None:
        """Store a small object; ``durable=False``: it may be lost in a power cut (a store that
        keeps what it acknowledged, such as S3, ignores this)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """A small object's content, or None if there is none."""

    @abstractmethod
    def download(self, key: str, dest: Path) -> tuple[str, int] | None:
        """Stream ``key`` into the local file ``dest``; the SHA-256 (hex) and size of what was
        written, hashed on the way, or None if there is no such object."""

    @abstractmethod
    def digest(self, key: str) -> tuple[str, int] | None:
        """SHA-256 (hex) and size of ``key``'s content, streamed; None if there is none."""

    @abstractmethod
    def stat(self, key: str) -> tuple[int, str | None] | None:
        """Size and tag of ``key`` without reading it; None if there is none.

        The tag is what :meth:`put_file` returned for the file, for as long as nothing has
        replaced or rewritten it since (None or another value otherwise), so a reader can
        tell cheaply that a file is still the one that was committed.
        """

    @abstractmethod
    def list_folders(self, prefix: str) -> list[str]:
        """Names of the folders directly below ``prefix`` ('' for the root)."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """All keys below ``prefix``, relative to it."""

    def local_path(self, key: str) -> Path | None:
        """The local file holding ``key``, if the backend is a local file system."""
        return None

    def read_tensors(self, key: str) -> HashedTensors | None:
        """The safetensors object ``key`` read into arrays and hashed in the same pass; None
        if there is no such object. A backend with no local file overrides this."""
        path = self.local_path(key)
        if path is None:
            raise NotImplementedError(f"{type(self).__name__} must implement read_tensors")
        try:
            with open(path, "rb", buffering=0) as f:
                return read_hashed(f.readinto, os.fstat(f.fileno()).st_size, self.uri(key))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotError(f"{self.uri(key)}: cannot read: {exc.strerror or exc}") from None

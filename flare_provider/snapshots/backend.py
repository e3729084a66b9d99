"""Where snapshot files live: the operations the store needs from a file system or a bucket.

Keys are '/'-separated paths relative to the store's root. Every write replaces a whole
object or file at once; none is ever visible half-written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path


class Backend(ABC):
    @abstractmethod
    def uri(self, key: str = "") -> str:
        """The URI of ``key`` (the root without one)."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store the local file ``path`` under ``key``, streaming it."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store a small object."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None:
        """A small object's content, or None if there is none."""

    @abstractmethod
    def download(self, key: str, dest: Path) -> bool:
        """Stream ``key`` into the local file ``dest``; False if there is no such object."""

    @abstractmethod
    def digest(self, key: str) -> tuple[str, int] | None:
        """SHA-256 (hex) and size of ``key``'s content, streamed; None if there is none."""

    @abstractmethod
    def list_folders(self, prefix: str) -> list[str]:
        """Names of the folders directly below ``prefix`` ('' for the root)."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """All keys below ``prefix``, relative to it."""

    def local_path(self, key: str) -> Path | None:
        """The local file holding ``key``, if the backend is a local file system."""
        return None

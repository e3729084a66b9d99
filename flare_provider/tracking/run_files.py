"""Files of a run kept in the snapshot store beside its rounds (curves, TensorBoard logs).

Under ``<root>/<federation>/<run>/`` next to the ``round_NNNNN`` folders::

    curves/round_00003.json                       the round's per-site curves (see .curves)
    tensorboard/<site>/events.out.tfevents.round_00003   one event file per site and round
    tensorboard/global/events.out.tfevents.round_00003   the global model's metrics

These are written whole under names fixed by the round, so a retried round replaces its
own files and never adds a second copy. The store's round readers skip these folders.
"""

from __future__ import annotations

from pathlib import Path

from ..files import file_digest
from ..snapshots import SnapshotStore


class RunFiles:
    """The run-level files of one run in ``store``."""

    def __init__(self, store: SnapshotStore, federation: str, run: str):
        self.backend = store.backend
        self.prefix = store.run_prefix(federation, run)

    def uri(self, name: str = "") -> str:
        return self.backend.uri(f"{self.prefix}/{name}" if name else self.prefix)

    def put_bytes(self, name: str, data: bytes, durable: bool = True) -> None:
        self.backend.put_bytes(f"{self.prefix}/{name}", data, durable)

    def put_file(self, name: str, path: Path) -> None:
        self.backend.put_file(f"{self.prefix}/{name}", path, file_digest(path)[0])

    def get_bytes(self, name: str) -> bytes | None:
        return self.backend.get_bytes(f"{self.prefix}/{name}")

    def list(self, folder: str) -> list[str]:
        """Names of the files below ``folder`` (relative to it); [] when there are none."""
        return self.backend.list_keys(f"{self.prefix}/{folder}")

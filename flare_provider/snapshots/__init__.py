"""Committed round snapshots on a local file system or S3 (numpy only, no Airflow).

See ``docs/snapshots.md``.
"""

from .errors import SnapshotCorrupted, SnapshotError
from .initial import load_initial_weights
from .naming import decode_name, encode_name
from .s3 import S3_SETTINGS, make_s3_client
from .store import Snapshot, SnapshotStore

__all__ = [
    "S3_SETTINGS",
    "Snapshot",
    "SnapshotCorrupted",
    "SnapshotError",
    "SnapshotStore",
    "decode_name",
    "encode_name",
    "load_initial_weights",
    "make_s3_client",
]

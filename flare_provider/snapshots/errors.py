"""Errors of the snapshot store."""


class SnapshotError(RuntimeError):
    """The store could not be read or written (after bounded retries), or holds no such round."""


class SnapshotCorrupted(SnapshotError):
    """A committed round whose files are missing or do not match their checksums."""

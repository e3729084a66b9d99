"""Uploads of global weights cut short, kept on disk so that the next upload sends only the rest.

An upload that announced its size and digest (SHA-256, or XXH3-128 from a sender that
knows this agent speaks it) is written straight into
``<incoming>/.upload-<task_id>+<size>+<digest>``. When its stream breaks, the bytes that
arrived stay there (across an agent restart too), and a new stream of the *same* payload
(same task id, size and digest: the file name says so) continues from them; a different
payload for that task id never touches them. The whole file's digest is checked at the
end as for any upload, so kept bytes that went bad fail the upload rather than a task.

One stream writes a kept upload at a time: a new stream of the same payload takes it over
(a cut connection may leave the old stream's handler waiting for data that never comes)
and the old one stops before its next write. Disk use is bounded: a kept upload goes
when its task is created, when it is older than :data:`KEPT_UPLOAD_TTL_S`, or when more
than :data:`MAX_KEPT_UPLOADS` are kept (the oldest first).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flare_provider.wire.checksums import SHA256, XXH3_128, display_name, identity_fields, is_digest
from flare_provider.wire.chunks import PARTIAL_PREFIX, PayloadError, PayloadTruncated, PayloadWriter, hash_prefix

from ..errors import InvalidTaskError
from .task_records import TASK_ID_RE

log = logging.getLogger(__name__)

KEPT_UPLOAD_PREFIX = ".upload-"  # not PARTIAL_PREFIX: the agent clears those at start, these outlive a restart
KEPT_UPLOAD_TTL_S = 24 * 3600.0  # a server retrying a transfer comes back well within this
MAX_KEPT_UPLOADS = 4  # a site takes one task per round of each run: a few cut uploads at a time at most
_CHECKSUM_BY_LENGTH = {64: SHA256, 32: XXH3_128}  # a kept upload's file name gives its digest only
_SEPARATOR = "+"  # never in a task id, so a file name splits back into its key


class UploadInterrupted(Exception):
    """The upload's stream broke; what arrived is kept for the next upload of the payload. ABORTED."""


class UploadConflict(Exception):
    """The upload does not fit what the agent holds (offset) or a newer stream took it over. ABORTED.

    ``held``: the bytes of the payload the agent holds, when the offset was the problem.
    """

    def __init__(self, message: str, held: int | None = None):
        super().__init__(message)
        self.held = held


class KeptUploadCorrupt(PayloadError):
    """A resumed upload did not verify as a whole; the kept bytes are dropped, the next upload starts over. DATA_LOSS."""


@dataclass(frozen=True)
class UploadKey:
    """Which payload an upload is: the task it is for, its size and its digest (of ``checksum``)."""

    task_id: str
    size: int
    digest: str
    checksum: str = SHA256

    def __post_init__(self) -> None:
        if not TASK_ID_RE.match(self.task_id) or self.task_id.startswith("."):
            raise InvalidTaskError(f"task {self.task_id!r}: task_id must be 1-128 letters, digits, '.', '_', ':' or '-'")
        if not is_digest(self.checksum, self.digest):
            (field,) = identity_fields(self.checksum, self.digest)
            length = next(n for n, checksum in _CHECKSUM_BY_LENGTH.items() if checksum == self.checksum)
            raise InvalidTaskError(
                f"task {self.task_id}: {field} must be {length} lowercase hex digits (its {display_name(self.checksum)})"
            )

    @classmethod
    def named_by(cls, message) -> "UploadKey | None":
        """The key a ``SubmitTaskHeader`` or ``UploadOffsetRequest`` names: by its XXH3-128
        or SHA-256, whichever the sender set; None when it set neither."""
        if message.payload_xxh3_128:
            return cls(message.task_id, message.payload_size, message.payload_xxh3_128, XXH3_128)
        if message.payload_sha256:
            return cls(message.task_id, message.payload_size, message.payload_sha256)
        return None

    @property
    def file_name(self) -> str:
        return f"{KEPT_UPLOAD_PREFIX}{self.task_id}{_SEPARATOR}{self.size}{_SEPARATOR}{self.digest}"

    @classmethod
    def from_file_name(cls, name: str) -> "UploadKey | None":
        try:
            task_id, size, digest = name.removeprefix(KEPT_UPLOAD_PREFIX).rsplit(_SEPARATOR, 2)
            return cls(task_id, int(size), digest, _CHECKSUM_BY_LENGTH[len(digest)])
        except (ValueError, KeyError, InvalidTaskError):
            return None


class _Slot:
    """The kept upload of one key: which stream owns it, and the digest of what it holds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: KeptUpload | None = None
        # (length, mtime, running SHA-256) after the last stream: saves reading the kept bytes
        # again when the next stream comes while the agent runs and the file is as it left it
        self.digest_at: tuple[int, int, object] | None = None


class KeptUpload:
    """One stream's claim on a kept upload: a file object for :class:`PayloadWriter`, writing after ``start``."""

    def __init__(self, uploads: "PartialUploads", key: UploadKey, slot: _Slot, start: int, digest, on_superseded):
        self.key = key
        self.start = start
        self.digest = digest
        self._uploads = uploads
        self._slot = slot
        self._on_superseded = on_superseded
        # Unbuffered: every byte is in the file once write() returns, so a stream taken over
        # never flushes old bytes into its successor's file when it closes.
        self._file = open(uploads.path(key), "r+b", buffering=0)
        self._file.seek(start)

    @property
    def current(self) -> bool:
        return self._slot.owner is self

    def write(self, data: bytes) -> None:
        # Under the slot's lock, so that a stream taken over never writes after its successor truncated.
        with self._slot.lock:
            if not self.current:
                raise UploadConflict(f"upload of task {self.key.task_id} taken over by a newer stream")
            view = memoryview(data)
            while view:
                view = view[self._file.write(view):]

    def flush(self) -> None:
        """Nothing to flush: writes are unbuffered."""

    def fileno(self) -> int:
        return self._file.fileno()

    def keep(self, received: int, digest) -> bool:
        """The stream broke after ``received`` bytes: keep them (and their digest) for the next stream.

        False when a newer stream owns the upload now: this one leaves it alone.
        """
        with self._slot.lock:
            kept = self.current
            if kept:
                self._slot.digest_at = (received, os.fstat(self._file.fileno()).st_mtime_ns, digest.copy())
                self._slot.owner = None
            self._file.close()
        return kept

    def complete(self) -> Path:
        """The whole payload arrived and verified: it leaves the kept uploads as a file of its own."""
        with self._slot.lock:
            if not self.current:
                raise UploadConflict(f"upload of task {self.key.task_id} taken over by a newer stream")
            os.fsync(self._file.fileno())
            self._file.close()
            # PARTIAL_PREFIX: should the agent die before the task takes the file, its start removes it
            fd, done = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=".part", dir=self._uploads.directory)
            os.close(fd)
            os.replace(self._uploads.path(self.key), done)
            self._slot.owner, self._slot.digest_at = None, None
            self._uploads._forget(self.key, self._slot)
        return Path(done)

    def discard(self) -> None:
        """What arrived is no good: drop it (unless a newer stream owns it now)."""
        with self._slot.lock:
            self._file.close()
            if self.current:
                self._uploads.path(self.key).unlink(missing_ok=True)
                self._slot.owner, self._slot.digest_at = None, None
                self._uploads._forget(self.key, self._slot)

    def supersede(self) -> None:
        """A newer stream takes over (called under the slot's lock)."""
        self._slot.owner = None
        if self._on_superseded is not None:
            self._on_superseded()


class PartialUploads:
    """The kept uploads of one agent, in its incoming folder. Thread-safe."""

    def __init__(self, directory: Path, ttl_s: float = KEPT_UPLOAD_TTL_S, max_kept: int = MAX_KEPT_UPLOADS):
        self.directory = Path(directory)
        self.ttl_s = ttl_s
        self.max_kept = max_kept
        self._lock = threading.Lock()
        self._slots: dict[UploadKey, _Slot] = {}

    def path(self, key: UploadKey) -> Path:
        return self.directory / key.file_name

    def offset(self, key: UploadKey) -> int:
        """How many bytes of this payload the agent holds (0: none)."""
        try:
            return min(self.path(key).stat().st_size, key.size)
        except FileNotFoundError:
            return 0

    def receive(
        self, key: UploadKey, offset: int, messages, what: str, on_superseded: Callable[[], None] | None = None
    ) -> Path:
        """Receive the chunks of payload ``key`` from ``offset`` on, then its end; returns the whole file.

        The caller owns the returned file. A stream that ends early (a cut connection,
        :class:`PayloadTruncated`) leaves what arrived kept, and :class:`UploadInterrupted`
        says how much; a bad stream drops it all (:class:`KeptUploadCorrupt` when a
        resumed upload does not verify as a whole).
        """
        upload = self.claim(key, offset, on_superseded)
        writer = PayloadWriter(upload, key.size, what, upload.start, upload.digest, key.checksum)
        try:
            writer.receive(messages)
            if writer.digest.hexdigest() != key.digest:
                raise PayloadError(
                    f"{what}: the payload received is not the one announced ({display_name(key.checksum)} {key.digest})"
                )
        except (PayloadTruncated, UploadConflict) as exc:
            if not upload.keep(writer.received, writer.digest) or isinstance(exc, UploadConflict):
                raise UploadConflict(f"{what}: taken over by a newer upload of the same payload") from None
            log.info("%s: stream cut after %d of %d bytes; kept for resuming", what, writer.received, key.size,
                     extra={"task_id": key.task_id})
            raise UploadInterrupted(
                f"{what}: the stream ended after {writer.received} of {key.size} bytes; the agent keeps them "
                f"(resume from byte {writer.received})"
            ) from None
        except PayloadError as exc:
            upload.discard()
            if upload.start:
                raise KeptUploadCorrupt(f"{exc} (resumed at byte {upload.start}; the kept bytes are dropped)") from None
            raise
        except BaseException:
            upload.discard()
            raise
        if upload.start:
            log.info("%s received, resumed at byte %d of %d", what, upload.start, key.size, extra={"task_id": key.task_id})
        return upload.complete()

    def claim(self, key: UploadKey, offset: int, on_superseded: Callable[[], None] | None = None) -> KeptUpload:
        """Take the upload of ``key`` for a stream whose chunks start at ``offset``.

        A stream still writing this payload is taken over (``on_superseded`` of its claim
        is called, to end its call). :class:`UploadConflict` when the agent holds fewer
        than ``offset`` bytes, or holds some and the stream starts from 0; bytes beyond
        ``offset`` are dropped, the stream sends them again.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sweep(keep=key)
        while True:
            with self._lock:
                slot = self._slots.setdefault(key, _Slot())
            with slot.lock:
                if self._slots.get(key) is slot:  # else dropped meanwhile: take the new slot
                    return self._claim_slot(key, slot, offset, on_superseded)

    def _claim_slot(self, key: UploadKey, slot: _Slot, offset: int, on_superseded) -> KeptUpload:
        """:meth:`claim` under the slot's lock."""
        if slot.owner is not None:
            log.info("upload of task %s taken over by a new stream at byte %d", key.task_id, offset,
                     extra={"task_id": key.task_id})
            slot.owner.supersede()
        path = self.path(key)
        stat = path.stat() if path.exists() else None
        held = stat.st_size if stat is not None else 0
        if offset > held or (offset == 0 and held):
            # A sender starts from 0 without asking (the usual case costs no round trip);
            # told what is kept, it sends the rest.
            raise UploadConflict(
                f"upload of task {key.task_id} starts at byte {offset}, but the agent holds {held} bytes of it; "
                "send from there",
                held=held,
            )
        cached = slot.digest_at
        as_left = cached is not None and stat is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns)
        with open(path, "ab") as f:  # creates it, and drops what lies beyond the offset
            f.truncate(offset)
        if as_left and cached[0] == offset:
            digest = cached[2].copy()
        else:  # after an agent restart, or resuming at another point: hash the kept bytes once
            digest = hash_prefix(path, offset, checksum=key.checksum)
        upload = KeptUpload(self, key, slot, offset, digest, on_superseded)
        slot.owner, slot.digest_at = upload, None
        return upload

    def _forget(self, key: UploadKey, slot: _Slot) -> None:
        """The upload of ``key`` is over: nothing of it to remember (called under the slot's lock)."""
        with self._lock:
            if self._slots.get(key) is slot:
                del self._slots[key]

    def discard_task(self, task_id: str) -> None:
        """Drop every kept upload of ``task_id`` (its task exists: none will be resumed)."""
        for path, key in self._kept():
            if key.task_id == task_id:
                self._drop(key, path)

    def sweep(self, keep: UploadKey | None = None) -> None:
        """Drop kept uploads older than the TTL, then the oldest beyond the count limit.

        Uploads a stream is writing stay, and so does ``keep``.
        """
        now = time.time()
        idle = []
        for path, key in self._kept():
            slot = self._slots.get(key)
            if key == keep or (slot is not None and slot.owner is not None):
                continue
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            if now - mtime > self.ttl_s:
                log.info("dropping the upload of task %s kept since %s", key.task_id, time.ctime(mtime))
                self._drop(key, path)
            else:
                idle.append((mtime, key, path))
        excess = len(idle) - (self.max_kept - (1 if keep is not None else 0))
        for _, key, path in sorted(idle)[: max(0, excess)]:
            log.info("dropping the upload of task %s: more than %d uploads kept", key.task_id, self.max_kept)
            self._drop(key, path)

    def _kept(self) -> list[tuple[Path, UploadKey]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.glob(f"{KEPT_UPLOAD_PREFIX}*"):
            key = UploadKey.from_file_name(path.name)
            if key is None:
                path.unlink(missing_ok=True)  # not a name this agent writes
            else:
                found.append((path, key))
        return found

    def _drop(self, key: UploadKey, path: Path) -> None:
        with self._lock:
            slot = self._slots.pop(key, None)
        if slot is None:
            path.unlink(missing_ok=True)
            return
        with slot.lock:
            if slot.owner is not None:
                slot.owner.supersede()
            slot.digest_at = None
            path.unlink(missing_ok=True)

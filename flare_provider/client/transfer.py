"""What moving weights over links that stall and break takes: progress, idleness, what to resume.

A transfer of weights (an upload with ``SubmitTask``, a download with ``FetchResult``)
has no bound on its total time: a slow link with a large model takes as long as it
takes. It ends instead when nothing moves for ``idle_timeout`` seconds
(:class:`IdleWatchdog` cancels the call), and a stream cut on the way is resumed from
the last byte the other end holds. :class:`TransferStats` says what each transfer
moved, so that what resuming saved can be seen; :class:`PartialDownload` is a download's
file while it is incomplete.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ..wire.checksums import SHA256, XXH3_128, new_hash
from ..wire.chunks import HELD_BYTES_KEY, PayloadTruncated, Source, format_bytes, hash_prefix

# What a stream cut on the way ends with, on either side; a new stream takes up from the offset.
CUT_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,  # connection refused, reset or closed
    grpc.StatusCode.CANCELLED,  # the connection went away under the call
    grpc.StatusCode.ABORTED,  # the agent kept the bytes of a cut upload, or a newer stream took it over
    grpc.StatusCode.DATA_LOSS,  # a resumed upload did not verify: the agent dropped the kept bytes
})
# Of those, the ones the agent itself answers with: what it kept or dropped, resume from there.
AGENT_SAYS_RESUME = frozenset({grpc.StatusCode.ABORTED, grpc.StatusCode.DATA_LOSS})
_DIGEST_CACHE_SIZE = 32


class TransferStalled(Exception):
    """Nothing moved for the idle timeout; the call was cancelled."""


class StartOver(Exception):
    """The bytes kept from a cut transfer cannot be used; the next attempt starts from byte 0."""


@dataclass
class TransferStats:
    """What one upload or download moved, over all its attempts."""

    method: str  # "SubmitTask", "FetchResult" or "DeployApp"
    task_id: str = ""
    payload_bytes: int = 0  # size of the whole payload
    start_offset: int = 0  # bytes the receiving end held already when the transfer began
    transferred_bytes: int = 0  # payload bytes sent or received, every attempt counted
    attempts: int = 0
    checksum: str = ""  # what the payload was checked with: "sha256" or "xxh3-128"
    resumed_at: list[int] = field(default_factory=list)  # where each attempt after a cut started
    completed: bool = False
    started: float = field(default_factory=time.monotonic, repr=False)  # time.monotonic()
    last_progress: float = field(default_factory=time.monotonic, repr=False)

    @property
    def repeated_bytes(self) -> int:
        """Bytes that crossed the link more than once: sent before a cut, lost, and sent again."""
        return max(0, self.transferred_bytes - (self.payload_bytes - self.start_offset))

    def moved(self, nbytes: int) -> None:
        self.transferred_bytes += nbytes
        self.last_progress = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last_progress


class IdleWatchdog:
    """Cancels a call when nothing moved for ``idle_timeout`` seconds (None or 0: never).

    A message passing is progress. A sender also sees progress through ``probe`` (asked
    once no message passed for a while, with a timeout): what the receiver says it
    holds, changing. Without it, a sender that handed its last chunks to gRPC would see
    nothing move while they drain from buffers over a slow link.
    """

    def __init__(
        self,
        idle_timeout: float | None,
        stats: TransferStats,
        direction: str,
        probe: Callable[[float], object] | None = None,
    ):
        self.idle_timeout = idle_timeout
        self.stats = stats
        self.direction = direction  # "sent" or "received", for the message
        self.probe = probe
        self.fired = False
        self._last = time.monotonic()
        self._done = threading.Event()

    def progress(self) -> None:
        self._last = self.stats.last_progress = time.monotonic()

    @contextmanager
    def watching(self, cancel: Callable[[], object]):
        """Watch while the body runs; an error after the watchdog cancelled becomes :class:`TransferStalled`."""
        if self.idle_timeout:
            threading.Thread(target=self._watch, args=(cancel,), name="transfer-watchdog", daemon=True).start()
        try:
            yield self
        except Exception:
            if self.fired:
                s = self.stats
                raise TransferStalled(
                    f"nothing moved for {self.idle_timeout:g} s (idle_timeout) after {format_bytes(s.transferred_bytes)} "
                    f"{self.direction} of a {format_bytes(s.payload_bytes)} payload; the transfer was given up"
                ) from None
            raise
        finally:
            self._done.set()

    def _watch(self, cancel: Callable[[], object]) -> None:
        interval = self.idle_timeout / 4 if self.probe is not None else self.idle_timeout
        seen = None  # what the probe said last
        while not self._done.wait(max(0.05, min(interval, self._last + self.idle_timeout - time.monotonic()))):
            idle = time.monotonic() - self._last
            if self.probe is not None and interval <= idle < self.idle_timeout:
                now = self.probe(interval)
                if now is not None and seen is not None and now != seen:
                    self.progress()
                seen = now if now is not None else seen
            elif idle >= self.idle_timeout:
                self.fired = True
                cancel()
                return


def counted(messages: Iterator, stats: TransferStats, watchdog: IdleWatchdog) -> Iterator:
    """``messages`` as they pass, counting payload bytes and telling the watchdog each one moved."""
    for message in messages:
        watchdog.progress()
        if message.WhichOneof("part") == "chunk":
            stats.moved(len(message.chunk.data))
        yield message


def is_cut(exc: BaseException) -> bool:
    """Whether ``exc`` ended a transfer that a new stream may take up from where it stopped."""
    if isinstance(exc, (PayloadTruncated, StartOver)):
        return True
    return isinstance(exc, grpc.RpcError) and exc.code() in CUT_CODES


def describe_failure(exc: Exception) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def held_bytes(exc: grpc.RpcError) -> int | None:
    """What the agent said it holds of an upload whose stream it refused for its offset (None: it did not say)."""
    if exc.code() != grpc.StatusCode.ABORTED:
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == HELD_BYTES_KEY:
            try:
                return int(value)
            except ValueError:
                return None
    return None


# ---- the identity of an upload ---------------------------------------------------------

_digests: dict[tuple, str] = {}
_digest_locks: dict[tuple, threading.Lock] = {}
_digests_lock = threading.Lock()


def payload_identity(source: Source, checksum: str = SHA256) -> tuple[int, str]:
    """Size and ``checksum`` digest of what is about to be uploaded: what the agent keeps a cut upload under.

    A file's digest is remembered while the file is unchanged, and computed once when
    threads upload the same file to several sites at the same time.
    """
    if isinstance(source, bytes):
        digest = new_hash(checksum)
        digest.update(source)
        return len(source), digest.hexdigest()
    path = Path(source).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, checksum)
    with _digests_lock:
        lock = _digest_locks.setdefault(key, threading.Lock())
    with lock:
        if key not in _digests:
            digest = hash_prefix(path, st.st_size, checksum=checksum)
            if path.stat().st_size != st.st_size:
                raise OSError(f"{path} changed while it was being read")
            _remember(key, digest.hexdigest())
        return st.st_size, _digests[key]


def remember_digest(path: str | os.PathLike, checksum: str, digest: str) -> None:
    """Note the ``checksum`` digest of a file just written (hashed as it was written), so that
    uploading it to any number of sites reads and hashes it no more (see :func:`payload_identity`)."""
    path = Path(path).resolve()
    st = path.stat()
    _remember((str(path), st.st_size, st.st_mtime_ns, st.st_ino, checksum), digest)


def _remember(key: tuple, digest: str) -> None:
    with _digests_lock:
        while len(_digests) >= _DIGEST_CACHE_SIZE:
            _digest_locks.pop(next(iter(_digests)), None)
            _digests.pop(next(iter(_digests)))
        _digests[key] = digest


def save_for_upload(tensors, path: Path) -> None:
    """Write ``tensors`` to a scratch safetensors file to upload, hashed as it is written:
    sending it to any number of sites then neither reads it back to hash it nor hashes it
    per site. The hash is XXH3-128, what agents that speak it get; an agent that does
    not (or a model small enough to go without asking) gets SHA-256, hashed once on demand."""
    from ..wire.tensors import save_file  # numpy: imported only where weights are handled

    digest = new_hash(XXH3_128)
    save_file(tensors, path, durable=False, digest=digest)
    remember_digest(path, XXH3_128, digest.hexdigest())


# ---- a download's file while it is incomplete ----------------------------------------------


class PartialDownload:
    """``<dest>.part``, the bytes of a result received so far, and ``<dest>.part.json``, whose they are.

    Kept across attempts and calls, so that a download cut short resumes; the record
    (task id and size) keeps one task's bytes from ever continuing another's.
    """

    def __init__(self, dest: Path, task_id: str):
        self.dest = dest
        self.task_id = task_id
        self.part = dest.with_name(dest.name + ".part")
        self.record = dest.with_name(dest.name + ".part.json")
        # (length, mtime, checksum, running digest) after the last attempt
        self._digest_at: tuple[int, int, str, object] | None = None
        self._file = None

    def resume_point(self) -> int:
        """How many bytes of this task's result are here (0: none usable)."""
        try:
            record = json.loads(self.record.read_text())
            held = self.part.stat().st_size
        except (OSError, ValueError):
            return 0
        if record.get("task_id") != self.task_id or held > record.get("payload_size", -1):
            return 0
        return held

    def prefix_digest(self, held: int, checksum: str):
        """The running ``checksum`` digest of the part's first ``held`` bytes (kept from the
        last attempt when the part is as it left it, read and hashed otherwise)."""
        if self._digest_at is not None:
            length, mtime, kept_checksum, digest = self._digest_at
            if (length, mtime, kept_checksum) == (held, self.part.stat().st_mtime_ns, checksum):
                return digest.copy()
        return hash_prefix(self.part, held, checksum=checksum)

    def open(self, payload_size: int, offset: int):
        """The part file, holding this result's first ``offset`` bytes, open to write what follows."""
        if offset:
            record = json.loads(self.record.read_text())
            if record.get("payload_size") != payload_size:
                self.discard()
                raise StartOver(f"the result of task {self.task_id} is not the size the kept part was of")
        else:
            self.record.write_text(json.dumps({"task_id": self.task_id, "payload_size": payload_size}))
        self._file = open(self.part, "r+b" if offset else "wb")
        self._file.truncate(offset)
        self._file.seek(offset)
        return self._file

    def keep(self, received: int, checksum: str, digest) -> None:
        """The stream broke: what was written stays for the next attempt."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._digest_at = (received, self.part.stat().st_mtime_ns, checksum, digest.copy())

    def finish(self) -> None:
        """The whole result arrived and verified: it becomes ``dest``."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.part, self.dest)
        self.record.unlink(missing_ok=True)

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._digest_at = None
        self.part.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)

"""Large payloads over gRPC streams: a header, ordered data chunks, then an end marker.

Every payload stream of the contract (``DeployAppRequest``, ``SubmitTaskRequest``,
``FetchResultReply``) is a message with a ``part`` oneof of ``header``, ``chunk`` and
``end``. The sender reads its source once, in chunks, hashing as it goes unless it knows
the digest already (a global model sent to many sites is hashed once); the receiver
writes the chunks to a temporary file, checking order, size and checksum on the way
(SHA-256, or XXH3-128 where both ends agreed on it: see :mod:`.checksums`), and keeps
nothing when anything is wrong. Memory stays at one chunk either way, so the
model size is bounded by disk, never by gRPC's message size limit.

A payload may also be sent from an offset, to finish one whose stream was cut: chunks
carry their offsets within the whole payload, and the end marker always holds the whole
payload's size and checksum, so the receiver, which kept the bytes before the offset,
checks the whole file. :class:`PayloadWriter` is the receiving half: after a cut it
still knows how many bytes it wrote and their running digest.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

from ..files import WRITEBACK_BYTES, start_writeback
from . import agent_pb2
from .checksums import SHA256, display_name, end_digest, end_fields, new_hash
from .payload_codec import Chunk

DEFAULT_CHUNK_SIZE = 1 << 20
# Every message of the contract is at most a chunk plus a little framing; the channel
# limits are set to this on both ends so that nothing larger is ever accepted.
MAX_CHUNK_SIZE = 4 << 20
MAX_MESSAGE_BYTES = MAX_CHUNK_SIZE + (64 << 10)
# Payloads larger than this are written and hashed by a second thread (see PayloadWriter).
WRITE_BEHIND_BYTES = 2 * DEFAULT_CHUNK_SIZE
WRITE_BEHIND_DEPTH = 4  # chunks queued for that thread at most: memory stays a few chunks
# ...which also has the kernel start writing each WRITEBACK_BYTES to disk as they arrive, so
# that the fsync at the end waits for the last few only.
PARTIAL_PREFIX = ".incoming-"  # files being received; a crash may leave one, safe to delete
# Trailing metadata of an upload refused for its offset: how many bytes of the payload the
# receiver holds, so that the sender resumes from there without asking.
HELD_BYTES_KEY = "flare-held-bytes"

Message = TypeVar("Message")
Source = bytes | str | os.PathLike


class PayloadError(ValueError):
    """A payload stream that was cut short, reordered, corrupted or malformed."""


class PayloadTooLarge(PayloadError):
    """A payload over the receiver's limit."""


class PayloadTruncated(PayloadError):
    """The stream ended before the payload's end marker: what a cut connection looks like."""


def format_bytes(n: int) -> str:
    """``n`` bytes for people: 8 GiB, 1.5 MiB, 312 B."""
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{round(value, 1):g} {unit}"


def payload_size(source: Source) -> int:
    return len(source) if isinstance(source, bytes) else os.stat(source).st_size


def hash_prefix(source: Source | BinaryIO, length: int, chunk_size: int = DEFAULT_CHUNK_SIZE, checksum: str = SHA256):
    """A ``checksum`` hash object fed with the first ``length`` bytes of ``source``.

    A file object is read from its start and left at ``length``. A source shorter than
    ``length`` is a :class:`PayloadError`.
    """
    digest = new_hash(checksum)
    if isinstance(source, bytes):
        if len(source) < length:
            raise PayloadError(f"the payload holds {len(source)} bytes, fewer than the {length} expected")
        digest.update(memoryview(source)[:length])
        return digest
    f = source if hasattr(source, "read") else open(source, "rb")
    try:
        f.seek(0)
        left = length
        while left > 0:
            block = f.read(min(chunk_size, left))
            if not block:
                raise PayloadError(f"the payload holds {length - left} bytes, fewer than the {length} expected")
            digest.update(block)
            left -= len(block)
    finally:
        if f is not source:
            f.close()
    return digest


def _blocks(source: Source | BinaryIO, chunk_size: int, offset: int) -> Iterator[bytes | memoryview]:
    if isinstance(source, bytes):
        view = memoryview(source)
        for start in range(offset, len(view), chunk_size):
            yield view[start : start + chunk_size]
        return
    if hasattr(source, "read"):
        source.seek(offset)
        yield from iter(lambda: source.read(chunk_size), b"")
        return
    with open(source, "rb") as f:
        f.seek(offset)
        yield from iter(lambda: f.read(chunk_size), b"")


def send_payload(
    message_type: type[Message],
    header,
    source: Source | BinaryIO,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    size: int | None = None,
    offset: int = 0,
    digest: str | None = None,
    checksum: str = SHA256,
) -> Iterator[Message]:
    """The messages of one payload stream: ``header``, the chunks of ``source``, the end.

    ``source`` is bytes, a file path or a seekable binary file object (``size`` is then
    required). ``header.payload_size`` is filled in, and ``header.offset`` when sending
    from ``offset`` on: the chunks start there, and the end marker still carries the
    whole payload's size and ``checksum`` (the receiver must expect that one). The digest
    is ``digest`` when the caller knows it (then nothing is hashed here: the receiver
    checks the bytes against it); otherwise the payload is hashed as it is read, the
    bytes before ``offset`` too. Arguments are checked now, in the caller's thread; the
    returned iterator reads lazily, so gRPC pulls one chunk at a time. Chunks come as
    :class:`~.payload_codec.Chunk`, which the contract's stub and handlers serialize.
    """
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE} bytes, got {chunk_size}")
    if size is None:
        size = payload_size(source)  # a missing file fails here, not inside gRPC's sending thread
    if not 0 <= offset <= size:
        raise ValueError(f"offset {offset} is outside the payload's {size} bytes")
    header.payload_size = size
    if offset:
        header.offset = offset
    new_hash(checksum)  # an unknown checksum fails here too
    return _payload_messages(message_type, header, source, chunk_size, size, offset, digest, checksum)


def _payload_messages(
    message_type: type[Message], header, source, chunk_size: int, size: int, offset: int, known: str | None,
    checksum: str,
) -> Iterator[Message]:
    yield message_type(header=header)
    # With a known digest (one hash of a file sent to many sites) nothing is hashed here:
    # the receiver checks every byte against it, and refuses a file changed mid-send.
    # Without one, the bytes before the offset are read and hashed too.
    digest = None if known else hash_prefix(source, offset, chunk_size, checksum)
    # Hashed in turn, not behind on a second thread as the receiver writes: measured, that
    # made a download slower (0.28 against 0.33 GB/s alone, 512 MiB, 2 cores).
    position = offset
    for block in _blocks(source, chunk_size, offset):
        if digest is not None:
            digest.update(block)
        yield Chunk(position, block)  # serialized by payload_codec with one copy of the block
        position += len(block)
    if position != size:
        # the file changed while it was being sent; the receiver would refuse it anyway
        raise PayloadError(f"the payload changed while being sent: announced {size} bytes, read {position}")
    yield message_type(end=agent_pb2.PayloadEnd(size=position, **end_fields(checksum, known or digest.hexdigest())))


def read_header(messages: Iterator, what: str):
    """The header that opens a payload stream; :class:`PayloadError` when it does not."""
    try:
        first = next(messages)
    except StopIteration:
        raise PayloadError(f"{what}: the stream is empty; it must start with a header") from None
    if first.WhichOneof("part") != "header":
        raise PayloadError(f"{what}: the stream must start with a header, got {first.WhichOneof('part') or 'an empty message'}")
    return first.header


def check_announced_size(announced: int, max_size: int, what: str) -> None:
    """:class:`PayloadTooLarge` when a header announces more than the receiver takes."""
    if announced > max_size:
        raise PayloadTooLarge(
            f"{what}: {announced} bytes ({format_bytes(announced)}) exceed the receiver's limit of "
            f"{max_size} bytes ({format_bytes(max_size)})"
        )


def receive_payload(
    messages: Iterable,
    announced_size: int,
    directory: str | os.PathLike,
    max_size: int,
    what: str,
    checksum: str = SHA256,
) -> Path:
    """Write the chunks that follow a header to a new file in ``directory``; return its path.

    The file appears only when the stream ended with an end marker whose size and
    ``checksum`` match what arrived; on any problem it is removed and :class:`PayloadError`
    (or :class:`PayloadTooLarge`) says what went wrong. The caller owns the returned
    file (move it into place or delete it).
    """
    check_announced_size(announced_size, max_size, what)
    fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            PayloadWriter(out, announced_size, what, checksum=checksum).receive(messages)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


class PayloadWriter:
    """Writes the chunks of one payload to ``out``, checking order, size and ``checksum``.

    ``out`` already holds the payload's first ``start`` bytes, whose running ``digest``
    (of ``checksum``) is given (a fresh one for ``start`` 0). ``received`` and ``digest`` describe exactly
    the bytes handed to ``out``, also after :meth:`receive` raised: that is what a cut
    transfer keeps and resumes from.

    A payload of more than :data:`WRITE_BEHIND_BYTES` is written and hashed by a second
    thread while the receiving thread waits for the next message: both steps release the
    GIL, and gRPC asks for a message only once the previous one was taken, so doing them
    in turn left the connection idle for each chunk's write and hash.
    """

    def __init__(self, out: BinaryIO, announced: int, what: str, start: int = 0, digest=None, checksum: str = SHA256,
                 inspect: Callable[[bytes], None] | None = None):
        if start > announced:
            raise PayloadError(f"{what}: {start} bytes held, more than the {announced} announced")
        self.out = out
        self.announced = announced
        self.what = what
        self.received = start
        self.accepted = start  # bytes checked and handed on: received, or queued to be written
        self.checksum = checksum
        self.digest = digest if digest is not None else new_hash(checksum)
        self.inspect = inspect  # also given every byte written, in order (a FiniteScan's feed)
        self._written_back = start

    def receive(self, messages: Iterable) -> None:
        """Take the chunks up to and including the end marker (the header was read already)."""
        if self.announced - self.received > WRITE_BEHIND_BYTES:
            with _WriteBehind(self._write_and_write_back) as behind:
                self._take(iter(messages), behind.put, behind.drain)
        else:
            self._take(iter(messages), self._write, lambda: None)

    def _take(self, messages: Iterator, write, drain) -> None:
        for message in messages:
            part = message.WhichOneof("part")
            if part == "chunk":
                chunk = message.chunk
                # A Chunk's data is a view into the message gRPC delivered; a protobuf chunk
                # message's field copies its bytes out on each read: read once.
                data = chunk.data
                self._check_chunk(chunk.offset, len(data))
                write(data)
            elif part == "end":
                drain()
                self._check_end(message.end)
                extra = next(messages, None)
                if extra is not None:
                    raise PayloadError(f"{self.what}: a {extra.WhichOneof('part') or 'message'} followed the end of the payload")
                return
            else:
                raise PayloadError(f"{self.what}: unexpected {part or 'empty message'} inside the payload")
        drain()
        raise PayloadTruncated(
            f"{self.what}: the stream ended after {self.received} of {self.announced} bytes without its end marker (truncated)"
        )

    def _check_chunk(self, offset: int, length: int) -> None:
        if offset != self.accepted:
            raise PayloadError(
                f"{self.what}: chunk at offset {offset} arrived where offset {self.accepted} was expected "
                "(chunks lost or out of order)"
            )
        if self.accepted + length > self.announced:  # and so never over the limit, which the announced size is within
            raise PayloadError(f"{self.what}: more data than the {self.announced} bytes announced in the header")
        self.accepted += length

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.digest.update(data)
        if self.inspect is not None:
            self.inspect(data)
        self.received += len(data)

    def _write_and_write_back(self, data: bytes) -> None:
        self._write(data)
        if self.received - self._written_back >= WRITEBACK_BYTES:
            self.out.flush()
            try:
                fd = self.out.fileno()
            except (AttributeError, OSError):  # not a file on disk: nothing to write back
                fd = None
            if fd is not None:
                start_writeback(fd, self._written_back, self.received - self._written_back)
            self._written_back = self.received

    def _check_end(self, end: agent_pb2.PayloadEnd) -> None:
        if end.size != self.received or self.received != self.announced:
            raise PayloadError(
                f"{self.what}: size mismatch: {self.received} bytes received, {self.announced} announced, "
                f"{end.size} in the end marker (truncated?)"
            )
        stated, actual = end_digest(end, self.checksum).lower(), self.digest.hexdigest()
        if stated != actual:
            raise PayloadError(
                f"{self.what}: {display_name(self.checksum)} mismatch: the sender says {stated or 'nothing'}, "
                f"the data received hashes to {actual}"
            )


class _WriteBehind:
    """A thread that calls ``write`` on each block put, in order, a few blocks behind.

    The first error ``write`` raises is kept (the blocks after it are taken off the queue
    unwritten) and raised again in the putting thread: by the next :meth:`put`, by
    :meth:`drain`, or when the block exits. Leaving the
    block, whatever happened, waits until every block already put is written, so what the
    writer's counters say is what the file holds.
    """

    _DONE = object()

    def __init__(self, write):
        self._write = write
        self._blocks: queue.Queue = queue.Queue(WRITE_BEHIND_DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="payload-write-behind", daemon=True)

    def __enter__(self) -> "_WriteBehind":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._finish()
        if self._error is not None:
            raise self._error

    def put(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._blocks.put(data)

    def drain(self) -> None:
        """Wait until every block put is written; raise what writing them raised."""
        self._blocks.join()
        if self._error is not None:
            raise self._error

    def _finish(self) -> None:
        if self._thread.is_alive():
            self._blocks.put(self._DONE)
            self._thread.join()

    def _run(self) -> None:
        while True:
            data = self._blocks.get()
            try:
                if data is self._DONE:
                    return
                if self._error is None:  # after an error, blocks are only taken off the queue
                    self._write(data)
            except BaseException as exc:  # handed to the receiving thread
                self._error = exc
            finally:
                self._blocks.task_done()

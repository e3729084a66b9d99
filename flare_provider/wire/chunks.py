"""Large payloads over gRPC streams: a header, ordered data chunks, then an end marker.

Every payload stream of the contract (``DeployAppRequest``, ``SubmitTaskRequest``,
``FetchResultReply``) is a message with a ``part`` oneof of ``header``, ``chunk`` and
``end``. The sender reads its source once, in chunks, hashing as it goes; the receiver
writes the chunks to a temporary file, checking order, size and SHA-256 on the way, and
keeps nothing when anything is wrong. Memory stays at one chunk either way, so the
model size is bounded by disk, never by gRPC's message size limit.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

from . import agent_pb2

DEFAULT_CHUNK_SIZE = 1 << 20
# Every message of the contract is at most a chunk plus a little framing; the channel
# limits are set to this on both ends so that nothing larger is ever accepted.
MAX_CHUNK_SIZE = 4 << 20
MAX_MESSAGE_BYTES = MAX_CHUNK_SIZE + (64 << 10)
PARTIAL_PREFIX = ".incoming-"  # files being received; a crash may leave one, safe to delete

Message = TypeVar("Message")
Source = bytes | str | os.PathLike


class PayloadError(ValueError):
    """A payload stream that was cut short, reordered, corrupted or malformed."""


class PayloadTooLarge(PayloadError):
    """A payload over the receiver's limit."""


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


def _blocks(source: Source | BinaryIO, chunk_size: int) -> Iterator[bytes]:
    if isinstance(source, bytes):
        view = memoryview(source)
        for start in range(0, len(view), chunk_size):
            yield bytes(view[start : start + chunk_size])
        return
    if hasattr(source, "read"):
        yield from iter(lambda: source.read(chunk_size), b"")
        return
    with open(source, "rb") as f:
        yield from iter(lambda: f.read(chunk_size), b"")


def send_payload(
    message_type: type[Message],
    header,
    source: Source | BinaryIO,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    size: int | None = None,
) -> Iterator[Message]:
    """The messages of one payload stream: ``header``, the chunks of ``source``, the end.

    ``source`` is bytes, a file path or a binary file object opened at its start
    (``size`` is then required). ``header.payload_size`` is filled in. Arguments are
    checked now, in the caller's thread; the returned iterator reads lazily, so gRPC
    pulls one chunk at a time.
    """
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE} bytes, got {chunk_size}")
    if size is None:
        size = payload_size(source)  # a missing file fails here, not inside gRPC's sending thread
    header.payload_size = size
    return _payload_messages(message_type, header, source, chunk_size, size)


def _payload_messages(message_type: type[Message], header, source, chunk_size: int, size: int) -> Iterator[Message]:
    yield message_type(header=header)
    digest = hashlib.sha256()
    offset = 0
    for block in _blocks(source, chunk_size):
        digest.update(block)
        yield message_type(chunk=agent_pb2.DataChunk(offset=offset, data=block))
        offset += len(block)
    if offset != size:
        # the file changed while it was being sent; the receiver would refuse it anyway
        raise PayloadError(f"the payload changed while being sent: announced {size} bytes, read {offset}")
    yield message_type(end=agent_pb2.PayloadEnd(size=offset, sha256=digest.hexdigest()))


def read_header(messages: Iterator, what: str):
    """The header that opens a payload stream; :class:`PayloadError` when it does not."""
    try:
        first = next(messages)
    except StopIteration:
        raise PayloadError(f"{what}: the stream is empty; it must start with a header") from None
    if first.WhichOneof("part") != "header":
        raise PayloadError(f"{what}: the stream must start with a header, got {first.WhichOneof('part') or 'an empty message'}")
    return first.header


def _check_announced_size(announced: int, max_size: int, what: str) -> None:
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
) -> Path:
    """Write the chunks that follow a header to a new file in ``directory``; return its path.

    The file appears only when the stream ended with an end marker whose size and
    SHA-256 match what arrived; on any problem it is removed and :class:`PayloadError`
    (or :class:`PayloadTooLarge`) says what went wrong. The caller owns the returned
    file (move it into place or delete it).
    """
    _check_announced_size(announced_size, max_size, what)
    fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            _copy_chunks(iter(messages), out, announced_size, what)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _copy_chunks(messages: Iterator, out: BinaryIO, announced: int, what: str) -> None:
    digest = hashlib.sha256()
    received = 0
    for message in messages:
        part = message.WhichOneof("part")
        if part == "chunk":
            chunk = message.chunk
            if chunk.offset != received:
                raise PayloadError(
                    f"{what}: chunk at offset {chunk.offset} arrived where offset {received} was expected "
                    "(chunks lost or out of order)"
                )
            received += len(chunk.data)
            if received > announced:  # and so never over the limit, which the announced size is within
                raise PayloadError(f"{what}: more data than the {announced} bytes announced in the header")
            digest.update(chunk.data)
            out.write(chunk.data)
        elif part == "end":
            _check_end(message.end, received, announced, digest.hexdigest(), what)
            extra = next(messages, None)
            if extra is not None:
                raise PayloadError(f"{what}: a {extra.WhichOneof('part') or 'message'} followed the end of the payload")
            return
        else:
            raise PayloadError(f"{what}: unexpected {part or 'empty message'} inside the payload")
    raise PayloadError(
        f"{what}: the stream ended after {received} of {announced} bytes without its end marker (truncated)"
    )


def _check_end(end: agent_pb2.PayloadEnd, received: int, announced: int, sha256: str, what: str) -> None:
    if end.size != received or received != announced:
        raise PayloadError(
            f"{what}: size mismatch: {received} bytes received, {announced} announced, {end.size} in the end marker (truncated?)"
        )
    if end.sha256.lower() != sha256:
        raise PayloadError(f"{what}: SHA-256 mismatch: the sender says {end.sha256}, the data received hashes to {sha256}")

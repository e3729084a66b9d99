"""Safetensors files of numpy arrays: written without extra copies and hashed on the way, read with clear errors."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..aggregation.spec import ModelSpec
from ..files import WritebackWriter
from ..wire.tensors import (
    MAX_HEADER_BYTES,
    SAFETENSORS_DTYPES,
    TensorFile,
    TensorFormatError,
    parse_header,
    write_tensors_to,
)
from .errors import SnapshotError

_STREAM_BYTES = 4 << 20  # one read of a stream: what is hashed at a time as it passes


# Pieces of a large write: each is hashed on a second thread while this one writes it.
_WRITE_PIECE = 8 << 20


class _HashingWriter:
    """Passes writes on to a file, hashing them: the model is written and hashed in one pass.

    A large write goes in pieces: each is hashed on a second thread while it is written
    (SHA-256 and the write both run without the GIL), so writing the model takes about as
    long as hashing it alone.
    """

    def __init__(self, out, hasher: ThreadPoolExecutor):
        self._out = out
        self._hasher = hasher
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _WRITE_PIECE):
            piece = view[start : start + _WRITE_PIECE]
            if len(piece) < _WRITE_PIECE:
                self.digest.update(piece)
                self._out.write(piece)
                continue
            hashed = self._hasher.submit(self.digest.update, piece)
            try:
                self._out.write(piece)
            finally:
                hashed.result()
        self.size += len(view)
        return len(view)


def write_hashed(
    tensors: Mapping[str, np.ndarray], path: Path, what: str, *, writeback: bool = False
) -> tuple[str, int]:
    """Write ``tensors`` to ``path``; its SHA-256 (hex) and size. ``what`` names them in errors.

    Streamed straight from the arrays' memory, tensor by tensor, so no second copy of
    the model is made (only a non-contiguous array is copied, one at a time), and hashed
    on the way rather than read back. ``writeback``: the caller fsyncs the file next (a
    local store adopting it), so its bytes go to disk while the rest is written.
    """
    try:
        ModelSpec.of(tensors)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    with ThreadPoolExecutor(1, thread_name_prefix="flare-hash") as hasher, open(path, "wb") as f:
        out = _HashingWriter(WritebackWriter(f) if writeback else f, hasher)
        write_tensors_to(out, tensors)
    return out.digest.hexdigest(), out.size


def load_tensors(path: Path, source: str, header_only: bool = False) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file (an empty dict with ``header_only``, after checking it opens).

    Read with plain file reads, not a memory map, so the file's pages do not stay in
    this process's resident memory next to the arrays.
    """
    try:
        with TensorFile(path) as f:
            return {} if header_only else {name: f[name] for name in f}
    except FileNotFoundError:
        raise SnapshotError(f"{source} does not exist") from None
    except (TensorFormatError, OSError) as exc:
        raise SnapshotError(f"{source} is not a safetensors file numpy can read: {exc}") from None


def read_stream(
    readinto: Callable[[memoryview], int],
    size: int,
    source: str,
    on_data: Callable[[memoryview], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a safetensors file of ``size`` bytes read from a stream,
    front to back, straight into their arrays: no file, no second copy of the model.

    ``readinto(view)`` fills the start of ``view`` and returns how many bytes it wrote (0 at
    the end of the stream). ``on_data(view)`` sees every byte of the stream once, in order
    (to hash it as it passes); a view of an array stays valid and unchanged afterwards.
    """

    def fail(problem: str) -> TensorFormatError:
        return TensorFormatError(f"{source}: not valid safetensors ({problem})")

    def fill(view: memoryview) -> None:
        done = 0
        while done < len(view):
            got = readinto(view[done : done + _STREAM_BYTES])
            if not got:
                raise fail(f"the stream ended after {consumed[0] + done} of {size} bytes")
            if on_data is not None:
                on_data(view[done : done + got])
            done += got
        consumed[0] += len(view)

    consumed = [0]
    if size < 8:
        raise fail("shorter than its header length")
    prefix = bytearray(8)
    fill(memoryview(prefix))
    (length,) = struct.unpack("<Q", prefix)
    if length > min(size - 8, MAX_HEADER_BYTES):
        raise fail(f"header of {length} bytes in a file of {size}")
    raw = bytearray(length)
    fill(memoryview(raw))
    layout, metadata, offsets = parse_header(bytes(raw), size, fail)
    tensors = {}
    for name in sorted(offsets, key=lambda n: offsets[n][0]):  # in the order they come
        code = layout[name].dtype
        if code not in SAFETENSORS_DTYPES:
            raise fail(f"tensor {name!r} has dtype {code}, which numpy cannot hold")
        array = np.empty(layout[name].shape, SAFETENSORS_DTYPES[code].newbyteorder("<"))
        fill(memoryview(array.reshape(-1).view(np.uint8)))
        tensors[name] = array.astype(array.dtype.newbyteorder("="), copy=False)
    return {name: tensors[name] for name in layout}, metadata


@dataclass
class HashedTensors:
    """What :func:`read_hashed` read: the arrays (None where the bytes were not a safetensors
    file numpy can hold: ``problem`` says why) and the SHA-256 and size of every byte that came."""

    tensors: dict[str, np.ndarray] | None
    sha256: str
    size: int
    problem: str | None = None


# Hashes waiting behind the reads at most: 4 MiB views of the arrays, not copies.
_HASHES_AHEAD = 16


def read_hashed(readinto: Callable[[memoryview], int], size: int, source: str) -> HashedTensors:
    """The tensors of a safetensors stream of ``size`` bytes, read straight into their arrays
    and hashed as they pass (in a second thread: the read and the hash overlap), one pass.

    A stream that is not valid safetensors is still read and hashed to its end, so that
    the caller can tell a damaged file (its SHA-256 differs) from a bad one.
    """
    digest, queued = hashlib.sha256(), []
    hashed = [0]

    def update(view: memoryview) -> None:
        digest.update(view)
        hashed[0] += len(view)

    with ThreadPoolExecutor(1, thread_name_prefix="flare-hash") as hasher:

        def on_data(view: memoryview) -> None:
            queued.append(hasher.submit(update, view))
            if len(queued) > _HASHES_AHEAD:
                queued.pop(0).result()

        problem, tensors = None, None
        try:
            tensors = read_stream(readinto, size, source, on_data)[0]
        except TensorFormatError as exc:
            problem = str(exc)
            scratch = memoryview(bytearray(4 << 20))
            while got := readinto(scratch):
                on_data(memoryview(bytes(scratch[:got])))
        _wait(queued)
    return HashedTensors(tensors, digest.hexdigest(), hashed[0], problem)


def _wait(futures: list[Future]) -> None:
    for future in futures:
        future.result()

"""Model weights as safetensors, read and written with numpy only (no PyTorch needed).

safetensors holds nothing but named arrays and a small string-to-string metadata map,
so reading one can never run code (unlike pickle). Malformed input raises
:class:`TensorFormatError` naming the source.

Files are written tensor by tensor (header, then each array's bytes straight from its
memory) and read with plain file reads into numpy arrays, never through a memory map:
a model of several GiB costs no more than the arrays a caller keeps, and pages of a
file being read do not count against the process. :class:`TensorFile` reads one tensor
(or a block of one) at a time, so a model on disk can stand in for one in memory.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from ..files import WritebackWriter, atomic_file

RESULT_KIND_KEY = "flare.result_kind"
"""Metadata key of a site's result file: ``"weights"`` (full weights) or ``"difference"``
(local minus global weights)."""
RESULT_PRIVACY_KEY = "flare.privacy"
"""Metadata key of a site's result file: JSON of the privacy filters the site applied to it
and the requests it refused (see ``docs/privacy.md``)."""

# safetensors dtype codes numpy can hold. BF16 and FP8 have no numpy dtype: such a file
# can be described, not loaded; trainers send float32 or float16.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
# Bytes per element of every code a valid file may name, numpy-readable or not.
_ITEMSIZE = {code: dtype.itemsize for code, dtype in SAFETENSORS_DTYPES.items()}
_ITEMSIZE.update({"BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8})
_METADATA = "__metadata__"
_MAX_HEADER = 100 << 20  # the safetensors library's own limit
MAX_HEADER_BYTES = _MAX_HEADER
# numpy's limits on an array: dimensions, and a size (in elements) that fits its index type
_MAX_DIMS = 32
_MAX_DIM = 2**63 - 1
_READ_BYTES = 1 << 30  # one read() per GiB: Linux reads at most 2 GiB at once


class TensorFormatError(ValueError):
    """Data that is not valid safetensors, or arrays that cannot be stored as such."""


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's dtype (safetensors' name, e.g. ``F32``) and shape, without its values."""

    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of_array(cls, array: np.ndarray) -> "TensorSpec":
        """The spec of a numpy array; TensorFormatError for a dtype safetensors cannot carry here."""
        if array.dtype not in _CODES:
            raise TensorFormatError(f"dtype {array.dtype}, which safetensors files cannot carry here")
        return cls(_CODES[array.dtype], tuple(int(d) for d in array.shape))

    @property
    def numpy_dtype(self) -> np.dtype:
        """The numpy dtype; KeyError for a code numpy cannot hold (e.g. ``BF16``)."""
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ITEMSIZE[self.dtype]

    def describe(self) -> str:
        return f"{self.numpy_dtype.name if self.dtype in SAFETENSORS_DTYPES else self.dtype}{list(self.shape)}"


def _check_arrays(tensors: Mapping[str, np.ndarray]) -> None:
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == _METADATA:
            raise TensorFormatError(f"tensor names must be non-empty strings other than {_METADATA!r}, got {name!r}")
        if not isinstance(value, np.ndarray):
            raise TensorFormatError(f"tensor {name!r} is a {type(value).__name__}, not a numpy array")


def write_tensors_to(
    out: BinaryIO, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` as safetensors to ``out``: the header, then one array after the other.

    No serialized copy of the model is made; only a non-contiguous or big-endian array is
    copied, one at a time. A :class:`TensorFile` is copied one tensor at a time.
    """
    if isinstance(tensors, TensorFile):
        layout = tensors.layout
    else:
        _check_arrays(tensors)
        layout = {}
        for name, array in tensors.items():
            code = _CODES.get(array.dtype.newbyteorder("="))
            if code is None:
                raise TensorFormatError(f"cannot store tensor {name!r} as safetensors: dtype {array.dtype} unsupported")
            layout[name] = TensorSpec(code, tuple(int(d) for d in array.shape))
    header: dict = {_METADATA: {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for name, spec in layout.items():
        end = offset + math.prod(spec.shape) * _ITEMSIZE[spec.dtype]
        header[name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as the safetensors library writes it
    out.write(struct.pack("<Q", len(raw)))
    out.write(raw)
    for name in layout:
        array = np.ascontiguousarray(tensors[name]).reshape(-1)
        out.write(array.astype(array.dtype.newbyteorder("<"), copy=False).view(np.uint8))


def dump_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """``tensors`` as safetensors bytes (for small payloads; files are written with :func:`save_file`)."""
    buffer = io.BytesIO()
    write_tensors_to(buffer, tensors, metadata)
    return buffer.getvalue()


def save_file(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    durable: bool = True,
    digest=None,
) -> None:
    """Write ``tensors`` to ``path`` atomically (a reader sees the old file or the whole new one),
    streamed tensor by tensor. ``durable=False`` skips the fsync, for scratch files.
    ``digest``: a hashlib object fed every byte written (the file's digest, without reading it back)."""
    with atomic_file(path, durable=durable) as file:
        out = WritebackWriter(file) if durable else file  # to disk as it comes: the fsync waits for the tail
        write_tensors_to(out if digest is None else HashingWriter(out, digest), tensors, metadata)


class HashingWriter:
    """Passes writes on to a file, feeding them to a hash on the way."""

    def __init__(self, out: BinaryIO, digest):
        self._out, self._digest = out, digest

    def write(self, data) -> int:
        self._digest.update(data)
        return self._out.write(data)


def load_bytes(data: bytes, source: str = "safetensors data") -> dict[str, np.ndarray]:
    """The arrays in safetensors ``data``; ``source`` names it in errors."""
    try:
        return safetensors.numpy.load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise TensorFormatError(f"{source}: not valid safetensors ({exc})") from None


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays in the safetensors file at ``path``, read into memory."""
    with TensorFile(path) as tensors:
        return {name: tensors[name] for name in tensors}


def describe_file(path: str | os.PathLike) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """Names, dtypes and shapes, plus the metadata map, of a safetensors file.

    Reads only the header, yet checks the whole layout (offsets cover the file
    exactly), so a truncated or padded file is refused without loading the weights.
    """
    try:
        with TensorFile(path) as tensors:
            return dict(tensors.layout), dict(tensors.metadata)
    except OSError as exc:
        raise TensorFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None


def parse_header(
    raw: bytes, size: int, fail: Callable[[str], Exception]
) -> tuple[dict[str, TensorSpec], dict[str, str], dict[str, tuple[int, int]]]:
    """Layout, metadata and absolute byte ranges of the tensors of a safetensors file of
    ``size`` bytes whose header (after its 8-byte length) is ``raw``; checked as strictly as
    the safetensors library does. ``fail(problem)`` makes the exception raised.
    """
    length = len(raw)

    def unique(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise fail("a name appears twice in the header")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except TensorFormatError:  # a name twice
        raise
    except RecursionError:
        raise fail("header is not JSON: nested too deeply") from None
    except ValueError as exc:  # bad UTF-8 or JSON, a number of thousands of digits
        raise fail(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    metadata = header.pop(_METADATA, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("metadata is not a map of strings")
    layout, offsets = {}, {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"tensor {name!r}: entry must have dtype, shape and data_offsets")
        dtype, shape, span = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
            raise fail(f"tensor {name!r}: unknown dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape)
            or math.prod(shape) > _MAX_DIM
        ):
            raise fail(f"tensor {name!r}: bad shape {shape!r}")
        if not isinstance(span, list) or len(span) != 2 or not all(type(o) is int and o >= 0 for o in span):
            raise fail(f"tensor {name!r}: bad data_offsets {span!r}")
        if span[1] - span[0] != math.prod(shape) * _ITEMSIZE[dtype]:
            raise fail(f"tensor {name!r}: data_offsets {span} do not fit {dtype}{shape}")
        layout[name] = TensorSpec(dtype, tuple(shape))
        offsets[name] = (span[0] + 8 + length, span[1] + 8 + length)
    # The tensors must tile the data exactly: no gaps, no overlaps, nothing after them.
    end = 8 + length
    for start, stop in sorted(offsets.values()):
        if start != end:
            raise fail("tensor data has gaps or overlaps")
        end = stop
    if end != size:
        raise fail(f"tensor data ends at byte {end}, the file at {size}")
    return layout, metadata, offsets


class TensorFile(Mapping[str, np.ndarray]):
    """A safetensors file as a read-only mapping of name -> array, read on access.

    The header is checked when the file is opened, as strictly as the safetensors
    library does (known dtypes, sizes that match the shapes, tensors that cover the
    data exactly, nothing after it). Each access reads the tensor anew with plain file
    reads. The file stays open until :meth:`close` (or garbage collection), so it can be
    read even after it was deleted.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise TensorFormatError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        self._closer = weakref.finalize(self, os.close, self._fd)
        self._buffer: np.ndarray | None = None
        self._placed: dict[str, tuple[np.dtype, int, int]] = {}
        try:
            self.layout, self.metadata, self._offsets = self._read_header()
        except BaseException:
            self.close()
            raise

    def _fail(self, problem: str) -> TensorFormatError:
        return TensorFormatError(f"{self.path}: not valid safetensors ({problem})")

    def _read_header(self) -> tuple[dict[str, TensorSpec], dict[str, str], dict[str, tuple[int, int]]]:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise self._fail("shorter than its header length")
        (length,) = struct.unpack("<Q", self._pread(8, 0))
        if length > min(size - 8, _MAX_HEADER):
            raise self._fail(f"header of {length} bytes in a file of {size}")
        return parse_header(self._pread(length, 8), size, self._fail)

    def _pread(self, count: int, offset: int) -> bytes:
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise self._fail("file is shorter than its header says")
        return data

    def _read_into(self, target: memoryview, offset: int) -> None:
        done = 0
        while done < len(target):
            view = target[done : done + _READ_BYTES]
            if hasattr(os, "preadv"):
                got = os.preadv(self._fd, [view], offset + done)
            else:
                data = os.pread(self._fd, len(view), offset + done)
                got = len(data)
                view[:got] = data
            if got <= 0:
                raise self._fail("file is shorter than its header says")
            done += got

    def dtype(self, name: str) -> np.dtype:
        """The numpy dtype of tensor ``name``; :class:`TensorFormatError` if numpy has none."""
        code = self.layout[name].dtype
        if code not in SAFETENSORS_DTYPES:
            raise TensorFormatError(f"{self.path}: tensor {name!r} has dtype {code}, which numpy cannot hold")
        return SAFETENSORS_DTYPES[code].newbyteorder("<")

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Tensor ``name`` (or the block ``rows`` of its first axis, step 1) as a new array."""
        shape, dtype = self.layout[name].shape, self.dtype(name)
        start, _ = self._offsets[name]
        if rows is not None:
            first, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("rows must be a slice with step 1")
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            shape, start = (max(0, stop - first), *shape[1:]), start + first * row_bytes
        array = np.empty(shape, dtype)
        self._read_into(memoryview(array.reshape(-1).view(np.uint8)), start)
        return array.astype(dtype.newbyteorder("="), copy=False)

    def read_range(self, name: str, first: int, count: int, buffer: np.ndarray) -> np.ndarray:
        """Elements ``first`` to ``first + count`` of tensor ``name``, flattened, read into the
        start of ``buffer`` (contiguous, at least that many bytes) and returned as a view of it.

        Safe to call from several threads at once, each with its own buffer.
        """
        placed = self._placed.get(name)
        if placed is None:  # looked up once per tensor: this is called for every small block
            placed = self._placed[name] = (self.dtype(name), math.prod(self.layout[name].shape), self._offsets[name][0])
        dtype, total, start = placed
        if first < 0 or count < 0 or first + count > total:
            raise ValueError(f"elements {first}..{first + count} are outside tensor {name!r}")
        raw = buffer.reshape(-1).view(np.uint8)[: count * dtype.itemsize]
        if raw.size != count * dtype.itemsize:
            raise ValueError(f"a buffer of {buffer.nbytes} bytes cannot hold {count} elements of {dtype}")
        self._read_into(memoryview(raw), start + first * dtype.itemsize)
        return raw.view(dtype)

    def blocks(self, name: str, elements: int = 1 << 15) -> Iterator[tuple[int, np.ndarray]]:
        """Tensor ``name``, flattened, as (first element, values) blocks of up to ``elements``.

        The values are a view of one buffer that the next block overwrites: use each
        block before asking for the next. Small blocks stay in the CPU's cache.
        """
        dtype = self.dtype(name)
        total = math.prod(self.layout[name].shape)
        nbytes = elements * dtype.itemsize
        if self._buffer is None or self._buffer.size < nbytes:
            self._buffer = np.empty(nbytes, np.uint8)
        start, _ = self._offsets[name]
        for first in range(0, total, elements):
            count = min(elements, total - first)
            chunk = self._buffer[: count * dtype.itemsize]
            self._read_into(memoryview(chunk), start + first * dtype.itemsize)
            yield first, chunk.view(dtype)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout)

    def __len__(self) -> int:
        return len(self.layout)

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

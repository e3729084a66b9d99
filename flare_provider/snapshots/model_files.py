"""Safetensors files of numpy arrays: written without extra copies and hashed on the way, read with clear errors."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..aggregation.spec import ModelSpec
from ..wire.tensors import TensorFile, TensorFormatError, write_tensors_to
from .errors import SnapshotError


class _HashingWriter:
    """Passes writes on to a file, hashing them: the model is written and hashed in one pass."""

    def __init__(self, out):
        self._out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.digest.update(data)
        written = self._out.write(data)
        self.size += written
        return written


def write_hashed(tensors: Mapping[str, np.ndarray], path: Path, what: str) -> tuple[str, int]:
    """Write ``tensors`` to ``path``; its SHA-256 (hex) and size. ``what`` names them in errors.

    Streamed straight from the arrays' memory, tensor by tensor, so no second copy of
    the model is made (only a non-contiguous array is copied, one at a time), and hashed
    on the way rather than read back.
    """
    try:
        ModelSpec.of(tensors)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    with open(path, "wb") as f:
        out = _HashingWriter(f)
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

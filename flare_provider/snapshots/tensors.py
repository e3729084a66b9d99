"""Safetensors files of numpy arrays: writing without extra copies, reading with clear errors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..aggregation.spec import ModelSpec
from ..wire.tensors import TensorFile, TensorFormatError, write_tensors_to
from .errors import SnapshotError


def write_tensors(tensors: Mapping[str, np.ndarray], path: Path, what: str) -> Path:
    """Write ``tensors`` to ``path``; ``what`` names them in errors.

    Streamed straight from the arrays' memory, tensor by tensor, so no second copy of
    the model is made (only a non-contiguous array is copied, one at a time).
    """
    try:
        ModelSpec.of(tensors)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    with open(path, "wb") as out:
        write_tensors_to(out, tensors)
    return path


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

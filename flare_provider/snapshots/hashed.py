"""A safetensors file written and hashed in one pass over the arrays.

Hashing the file after writing it would read the whole model a second time; instead the
streamed writer of :mod:`flare_provider.wire.tensors` writes through a file object that
hashes what passes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..aggregation.spec import ModelSpec
from ..wire.tensors import write_tensors_to


class _HashingWriter:
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
    """Write ``tensors`` to ``path`` as safetensors; its SHA-256 (hex) and size.

    ``what`` names the tensors in errors.
    """
    try:
        ModelSpec.of(tensors)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    with open(path, "wb") as f:
        out = _HashingWriter(f)
        write_tensors_to(out, tensors)
    return out.digest.hexdigest(), out.size

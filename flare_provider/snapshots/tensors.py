"""Safetensors files of numpy arrays: writing without extra copies, reading with clear errors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..aggregation.spec import ModelSpec
from .errors import SnapshotError


def write_tensors(tensors: Mapping[str, np.ndarray], path: Path, what: str) -> Path:
    """Write ``tensors`` to ``path``; ``what`` names them in errors.

    safetensors writes straight from the arrays' memory, so no second copy of the model
    is made (only a non-contiguous array is copied, one at a time).
    """
    try:
        ModelSpec.of(tensors)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    contiguous = {name: a if a.flags.c_contiguous else np.ascontiguousarray(a) for name, a in tensors.items()}
    save_file(contiguous, str(path))
    return path


def load_tensors(path: Path, source: str, header_only: bool = False) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file (an empty dict with ``header_only``, after checking it opens)."""
    try:
        with safe_open(str(path), framework="np") as f:
            if header_only:
                return {}
            return {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise SnapshotError(f"{source} does not exist") from None
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"{source} is not a safetensors file numpy can read: {exc}") from None

"""Model weights as safetensors, read and written with numpy only (no PyTorch needed).

safetensors holds nothing but named arrays and a small string-to-string metadata map,
so reading one can never run code (unlike pickle). Malformed input raises
:class:`TensorFormatError` naming the source.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from ..files import write_atomic

RESULT_KIND_KEY = "flare.result_kind"
"""Metadata key of a site's result file: ``"weights"`` (full weights) or ``"difference"``
(local minus global weights)."""


class TensorFormatError(ValueError):
    """Data that is not valid safetensors, or arrays that cannot be stored as such."""


@dataclass(frozen=True)
class TensorSpec:
    """A stored tensor's dtype (safetensors' name, e.g. ``F32``) and shape."""

    dtype: str
    shape: tuple[int, ...]


def _check_arrays(tensors: Mapping[str, np.ndarray]) -> None:
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TensorFormatError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(value, np.ndarray):
            raise TensorFormatError(f"tensor {name!r} is a {type(value).__name__}, not a numpy array")


def dump_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """``tensors`` as safetensors bytes (arrays are copied to C order as needed)."""
    _check_arrays(tensors)
    try:
        return safetensors.numpy.save(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=dict(metadata) if metadata else None
        )
    except SafetensorError as exc:
        raise TensorFormatError(f"cannot store these tensors as safetensors: {exc}") from None


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically: a reader sees the old file or the whole new one."""
    write_atomic(path, dump_bytes(tensors, metadata))


def load_bytes(data: bytes, source: str = "safetensors data") -> dict[str, np.ndarray]:
    """The arrays in safetensors ``data``; ``source`` names it in errors."""
    try:
        return safetensors.numpy.load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise TensorFormatError(f"{source}: not valid safetensors ({exc})") from None


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays in the safetensors file at ``path``."""
    try:
        return safetensors.numpy.load_file(path)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise TensorFormatError(f"{path}: not valid safetensors ({exc})") from None


def describe_file(path: str | os.PathLike) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """Names, dtypes and shapes, plus the metadata map, of a safetensors file.

    Reads only the header, yet checks the whole layout (offsets cover the file
    exactly), so a truncated or padded file is refused without loading the weights.
    """
    try:
        with safe_open(path, framework="np") as f:
            specs = {}
            for name in f.keys():
                piece = f.get_slice(name)
                specs[name] = TensorSpec(piece.get_dtype(), tuple(piece.get_shape()))
            return specs, dict(f.metadata() or {})
    except (SafetensorError, ValueError, TypeError) as exc:
        raise TensorFormatError(f"{path}: not valid safetensors ({exc})") from None
    except OSError as exc:
        raise TensorFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None

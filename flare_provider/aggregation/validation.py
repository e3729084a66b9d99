"""Checking a site's update against the global model before it is aggregated.

An update must have exactly the global model's tensor names, each with the same shape
and dtype, only finite values, and a file no larger than such a model can be. Anything
else is refused with :class:`UpdateRejected`, whose message names the site, the tensor
and the problem; the round goes on without that site.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..wire.tensors import SAFETENSORS_DTYPES, TensorFile, TensorFormatError
from .kernel import count_nonfinite
from .spec import ModelSpec

_NAMES_SHOWN = 10


class UpdateRejected(ValueError):
    """A site's update that cannot be aggregated; the round continues without it."""

    def __init__(self, site: str, problem: str, tensor: str | None = None):
        self.site = site
        self.tensor = tensor
        self.problem = problem
        where = f"tensor {tensor!r}: " if tensor is not None else ""
        super().__init__(f"update from site {site!r} rejected: {where}{problem}")


def validate_update(
    reference: ModelSpec | Mapping[str, np.ndarray],
    update: Mapping[str, np.ndarray] | str | os.PathLike,
    *,
    site: str = "?",
    max_bytes: int | None = None,
    nonfinite: Mapping[str, int] | None = None,
) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` fits the model ``reference``.

    ``reference`` is the global weights or their :class:`ModelSpec`. ``update`` is either
    tensors in memory or the path of a safetensors file; a file is checked without
    loading it whole: its size first (at most ``max_bytes``, by default what a file of
    this model can take), then its header, then one tensor at a time for finite values.
    ``nonfinite``: the file's non-finite values per floating tensor, counted already (a
    :class:`~flare_provider.wire.finite_scan.FiniteScan` as it was received); the file is
    then not read again to count them.
    """
    spec = reference if isinstance(reference, ModelSpec) else ModelSpec.of(reference)
    if isinstance(update, Mapping):
        _check_names(spec, update.keys(), site)
        for name, array in update.items():
            if not isinstance(array, np.ndarray):
                raise UpdateRejected(site, f"is a {type(array).__name__}, not an array", name)
            _check_layout(spec, name, tuple(array.shape), array.dtype, site)
            _check_finite(array, name, site)
        return
    path = Path(update)
    _check_size(spec, path, site, max_bytes)
    with open_update(path, site) as tensors:
        _check_names(spec, tensors.keys(), site)
        for name in spec:
            stored = tensors.layout[name]
            dtype = SAFETENSORS_DTYPES.get(stored.dtype)
            if dtype is None:
                raise UpdateRejected(
                    site, f"dtype {stored.dtype} cannot be aggregated; expected {spec[name].numpy_dtype.name}", name
                )
            _check_layout(spec, name, stored.shape, dtype, site)
        floating = [name for name in spec if spec[name].numpy_dtype.kind == "f"]
        if nonfinite is not None and all(name in nonfinite for name in floating):
            bad = nonfinite
        else:
            bad = count_nonfinite(tensors, floating)  # on every core, block by block
        for name in floating:
            if bad[name]:
                raise UpdateRejected(site, f"{bad[name]} non-finite value(s) (NaN or Inf)", name)


def open_update(path: Path, site: str) -> TensorFile:
    """The update file opened for reading tensor by tensor (plain reads, header checked)."""
    try:
        return TensorFile(path)
    except (TensorFormatError, OSError) as exc:
        raise UpdateRejected(site, f"not a readable safetensors file ({exc})") from None


def _check_size(spec: ModelSpec, path: Path, site: str, max_bytes: int | None) -> None:
    limit = spec.max_file_bytes() if max_bytes is None else max_bytes
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UpdateRejected(site, f"cannot read the update file: {exc.strerror or exc}") from None
    if size > limit:
        raise UpdateRejected(site, f"file is {size} bytes, more than the {limit} an update of this model may take")


def _names(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def _check_names(spec: ModelSpec, names: Iterable[str], site: str) -> None:
    names = set(names)
    missing = [n for n in spec if n not in names]
    extra = names.difference(spec)
    problems = []
    if missing:
        problems.append(f"missing tensors {_names(missing)}")
    if extra:
        problems.append(f"unexpected tensors {_names(extra)}")
    if problems:
        raise UpdateRejected(site, "; ".join(problems))


def _check_layout(spec: ModelSpec, name: str, shape: tuple[int, ...], dtype: np.dtype, site: str) -> None:
    expected = spec[name]
    if shape != expected.shape:
        raise UpdateRejected(site, f"shape {list(shape)}, expected {list(expected.shape)}", name)
    if dtype != expected.numpy_dtype:
        raise UpdateRejected(site, f"dtype {np.dtype(dtype).name}, expected {expected.numpy_dtype.name}", name)


def _check_finite(array: np.ndarray, name: str, site: str) -> None:
    if array.dtype.kind != "f":
        return
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise UpdateRejected(site, f"{bad} non-finite value(s) (NaN or Inf)", name)

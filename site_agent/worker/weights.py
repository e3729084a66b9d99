"""Weights on disk (safetensors only) and the checks a trainer's output must pass.

Torch is imported only when a trainer works with torch tensors, so trainers built on
numpy alone start fast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flare_provider.files import atomic_file
from flare_provider.wire.checksums import XXH3_128, new_hash
from flare_provider.wire.tensors import (
    SAFETENSORS_DTYPES,
    HashingWriter,
    TensorFile,
    TensorFormatError,
    TensorSpec,
    describe_file,
    write_tensors_to,
)

# dtype names (numpy's and torch's spelling) -> safetensors dtype codes
_DTYPE_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}
_FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
# torch dtypes whose CPU tensors numpy can view without a copy
_NUMPY_VIEWABLE = {name for name, code in _DTYPE_CODES.items() if code in SAFETENSORS_DTYPES}


class WeightsError(ValueError):
    """Weights that are unreadable or not what was expected; the message names the tensor."""


def tensor_layout(path: Path) -> dict[str, TensorSpec]:
    """Names, dtypes and shapes in a safetensors file, read from its header only."""
    if not Path(path).is_file():
        raise WeightsError(f"{Path(path).name}: weights file is missing")
    try:
        return describe_file(path)[0]
    except TensorFormatError as exc:
        raise WeightsError(f"{Path(path).name}: not a readable safetensors file ({exc})") from None


def load_weights(path: Path, tensor_format: str = "numpy") -> dict[str, Any]:
    """All tensors of a safetensors file, as numpy arrays or (``"torch"``) CPU tensors.

    Numpy arrays are read from the file straight into their memory, one tensor at a time
    (no copy of the whole file in memory first); torch tensors come from the safetensors
    library, which maps the file and copies a page only when a trainer changes it.
    """
    if tensor_format not in ("numpy", "torch"):
        raise WeightsError(f"unknown tensor_format {tensor_format!r}; use 'numpy' or 'torch'")
    try:
        if tensor_format == "torch":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        with TensorFile(path) as tensors:
            unheld = {s.dtype for s in tensors.layout.values()} - set(SAFETENSORS_DTYPES)
            if unheld:
                raise TensorFormatError(f"tensors of dtype {', '.join(sorted(unheld))} have no numpy dtype")
            return {name: tensors.read(name) for name in tensors}
    except (OSError, TensorFormatError, ValueError) as exc:
        raise WeightsError(f"{Path(path).name}: cannot load weights ({exc})") from None


def convert_weights(weights: Mapping[str, Any], tensor_format: str = "numpy") -> dict[str, Any]:
    """``weights`` as numpy arrays or (``"torch"``) CPU tensors, whichever they were."""
    if tensor_format == "torch":
        import torch

        return {k: v if _is_torch(v) else torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    return {k: v.detach().cpu().numpy() if _is_torch(v) else np.asarray(v) for k, v in weights.items()}


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _describe(name: str, value: Any) -> TensorSpec:
    if _is_torch(value):
        dtype = str(value.dtype).removeprefix("torch.")
    elif isinstance(value, np.ndarray):
        dtype = value.dtype.name
    else:
        raise WeightsError(f"tensor {name!r} is a {type(value).__name__}, expected a numpy array or torch tensor")
    code = _DTYPE_CODES.get(dtype)
    if code is None:
        raise WeightsError(f"tensor {name!r} has dtype {dtype}, which cannot be stored")
    return TensorSpec(code, tuple(int(d) for d in value.shape))


def _all_finite(value: Any) -> bool:
    if _is_torch(value):
        import torch

        return bool(torch.isfinite(value).all())
    return bool(np.isfinite(value).all())


def check_update(expected: Mapping[str, TensorSpec], weights: Any, is_difference: bool) -> None:
    """Raise :class:`WeightsError` unless ``weights`` fit the global model's layout and are finite.

    With no global weights (``expected`` empty: the site initialises the model) any
    non-empty set of full weights is accepted.
    """
    if not isinstance(weights, Mapping):
        raise WeightsError(f"the trainer returned weights as a {type(weights).__name__}, expected a dict of tensors")
    if not weights:
        raise WeightsError("the trainer returned no weights")
    if not all(isinstance(name, str) for name in weights):
        raise WeightsError("tensor names must be strings")
    if expected:
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            raise WeightsError(f"the returned weights do not match the global model: missing {missing}, unexpected {extra}")
    elif is_difference:
        raise WeightsError("a weight difference needs global weights; the first round must return full weights")
    for name, value in weights.items():
        spec = _describe(name, value)
        want = expected.get(name)
        if want is not None and spec != want:
            raise WeightsError(
                f"tensor {name!r} is {spec.dtype}{list(spec.shape)}, the global model has {want.dtype}{list(want.shape)}"
            )
        if spec.dtype in _FLOAT_CODES and not _all_finite(value):
            raise WeightsError(f"tensor {name!r} holds NaN or infinite values")


def save_weights(path: Path, weights: Mapping[str, Any], metadata: dict[str, str] | None = None) -> tuple[str, int]:
    """Write ``weights`` as safetensors atomically (temp file, then rename); the file's
    XXH3-128 (hex) and size, hashed as it was written.

    Streamed tensor by tensor from the arrays' own memory (a CPU torch tensor is viewed as
    an array, not copied); only a bfloat16 or float8 tensor, which numpy cannot view, goes
    through the safetensors library, which builds the whole file in memory first.

    Not fsynced: the worker records the digest with the result (durably), and an agent
    restarted after a power cut checks the file against it (``TaskRecords``), so a result
    whose bytes never reached the disk is not served. Flushing hundreds of MiB on every
    task would cost more than the rare retraining it saves.
    """
    digest = new_hash(XXH3_128)
    if any(_is_torch(v) for v in weights.values()):
        import torch

        tensors = {k: (v if _is_torch(v) else torch.from_numpy(np.asarray(v, order="C"))) for k, v in weights.items()}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if any(str(v.dtype).removeprefix("torch.") not in _NUMPY_VIEWABLE for v in tensors.values()):
            from safetensors.torch import save

            data = save(tensors, metadata=metadata)
            digest.update(data)
            with atomic_file(path, mode=0o600, durable=False) as out:
                out.write(data)
            return digest.hexdigest(), len(data)
        arrays = {k: v.numpy() for k, v in tensors.items()}
    else:
        arrays = {k: np.asarray(v, order="C") for k, v in weights.items()}
    with atomic_file(path, mode=0o600, durable=False) as out:
        write_tensors_to(HashingWriter(out, digest), arrays, metadata)
        size = out.tell()
    return digest.hexdigest(), size


def finite_metrics(metrics: Any, what: str) -> dict[str, float]:
    """Metrics as ``{name: float}``; raises :class:`WeightsError` for anything else or a NaN."""
    from ..trainer import as_number

    if not isinstance(metrics, Mapping):
        raise WeightsError(f"{what} must be a dict of name -> number")
    clean = {}
    for name, value in metrics.items():
        try:
            number = as_number(value, f"metric {name!r}")
        except TypeError as exc:
            raise WeightsError(f"{what}: {exc}") from None
        if not math.isfinite(number):
            raise WeightsError(f"{what}: metric {name!r} is {number}")
        clean[str(name)] = number
    return clean

"""What a model looks like: tensor names, shapes and dtypes, without the values.

An update is checked against the global model's spec before a single value of it is
read, so a malformed or oversized file is refused cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..wire.tensors import SAFETENSORS_DTYPES, TensorFile, TensorSpec

# Room for the safetensors header (names, shapes, offsets, metadata) on top of the data.
HEADER_ALLOWANCE_BYTES = 1 << 20
HEADER_ALLOWANCE_PER_TENSOR = 1024


class ModelSpec(Mapping[str, TensorSpec]):
    """Tensor name -> (shape, dtype) of a model, in the model's own order."""

    def __init__(self, tensors: Mapping[str, TensorSpec]):
        self._tensors = dict(tensors)

    @classmethod
    def of(cls, weights: Mapping[str, np.ndarray]) -> ModelSpec:
        """The spec of weights (in memory, or a :class:`TensorFile` read from its header only);
        refuses dtypes an update could not be stored in."""
        if isinstance(weights, TensorFile):
            for name, stored in weights.layout.items():
                if stored.dtype not in SAFETENSORS_DTYPES:
                    raise ValueError(f"tensor {name!r} has dtype {stored.dtype}, which cannot be aggregated here")
            specs = dict(weights.layout)
            weights = {}
        else:
            specs = {}
        for name, array in weights.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
            if not isinstance(array, np.ndarray):
                raise ValueError(f"tensor {name!r} is a {type(array).__name__}, not a numpy array")
            if array.dtype not in SAFETENSORS_DTYPES.values():
                raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors files cannot carry here")
            specs[name] = TensorSpec.of_array(array)
        if not specs:
            raise ValueError("a model needs at least one tensor")
        return cls(specs)

    def __getitem__(self, name: str) -> TensorSpec:
        return self._tensors[name]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the model."""
        return sum(spec.nbytes for spec in self._tensors.values())

    def max_file_bytes(self) -> int:
        """The largest safetensors file an update of this model can honestly be."""
        return self.nbytes + HEADER_ALLOWANCE_BYTES + HEADER_ALLOWANCE_PER_TENSOR * len(self)

    def floating(self) -> list[str]:
        """Names of the floating-point tensors (the ones an optimizer steps)."""
        return [name for name, spec in self._tensors.items() if spec.numpy_dtype.kind == "f"]

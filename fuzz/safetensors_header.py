"""Fuzz target: the safetensors header of a site's update, as the server checks it and reads it.

``validate_update`` may only refuse with :class:`UpdateRejected`, the reader with
:class:`TensorFormatError`, loading a snapshot's model with :class:`SnapshotError`; any
other exception (or a Rust panic in the safetensors library) is a finding.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["flare_provider"]):
    from flare_provider.aggregation.spec import ModelSpec
    from flare_provider.aggregation.validation import UpdateRejected, validate_update
    from flare_provider.snapshots.errors import SnapshotError
    from flare_provider.snapshots.model_files import load_tensors
    from flare_provider.wire.tensors import TensorFile, TensorFormatError, load_bytes

from fuzz import seeds

SPEC = ModelSpec.of(seeds.MODEL)
PATH = Path(tempfile.mkdtemp(prefix="flare-fuzz-tensors-")) / "update.safetensors"


def test_one_input(data: bytes) -> None:
    PATH.write_bytes(data)
    try:
        validate_update(SPEC, PATH, site="site-x")
    except UpdateRejected:
        pass
    try:
        with TensorFile(PATH) as tensors:
            for name in tensors:
                try:
                    tensors[name]
                except TensorFormatError:  # a dtype numpy cannot hold: described, not loaded
                    pass
    except TensorFormatError:
        pass
    try:
        load_tensors(PATH, "model.safetensors")
    except SnapshotError:
        pass
    try:
        load_bytes(data, "update")
    except TensorFormatError:
        pass


def seed_inputs() -> dict[str, bytes]:
    return {"model": seeds.model_file()}


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()

"""The safetensors header of a site's update, and of any model file the server reads.

Whatever a file holds, checking an update gives :class:`UpdateRejected` naming the site
(or accepts it: then it has exactly the model's tensors), loading a snapshot's model gives
:class:`SnapshotError` naming the file, and the reader itself raises only
:class:`TensorFormatError`. No header makes the reader allocate or compute without bound.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
from hostile_support import broken_bytes, examples, hostile_values, json_safe
from hypothesis import example, given
from hypothesis import strategies as st

from flare_provider.aggregation.spec import ModelSpec
from flare_provider.aggregation.validation import UpdateRejected, validate_update
from flare_provider.snapshots.errors import SnapshotError
from flare_provider.snapshots.model_files import load_tensors
from flare_provider.wire.tensors import TensorFile, TensorFormatError, dump_bytes, load_bytes

MODEL = {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}
SPEC = ModelSpec.of(MODEL)
GOOD = dump_bytes(MODEL)


def header_of(data: bytes) -> dict:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def with_header(header: dict, body: bytes, pad: bool = True) -> bytes:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


GOOD_HEADER, GOOD_BODY = header_of(GOOD), GOOD[8 + struct.unpack("<Q", GOOD[:8])[0] :]


def check_file(data: bytes) -> None:
    folder = Path(tempfile.mkdtemp(prefix="tensor-prop-"))
    try:
        path = folder / "update.safetensors"
        path.write_bytes(data)
        try:
            validate_update(SPEC, path, site="site-x")
        except UpdateRejected as exc:
            assert exc.site == "site-x" and "site-x" in str(exc)
        try:
            tensors = load_tensors(path, "round_00001/model.safetensors")
        except SnapshotError as exc:
            assert "round_00001/model.safetensors" in str(exc)
        else:
            assert all(isinstance(a, np.ndarray) for a in tensors.values())
        try:
            with TensorFile(path) as f:
                for name in f:
                    try:
                        assert f[name].nbytes == f.layout[name].nbytes
                    except TensorFormatError:  # a dtype numpy cannot hold (BF16...): described, not loaded
                        pass
        except TensorFormatError as exc:
            assert str(path) in str(exc)
        try:
            load_bytes(data, "update of site-x")
        except TensorFormatError as exc:
            assert "update of site-x" in str(exc)
        assert path.read_bytes() == data and os.listdir(folder) == ["update.safetensors"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


TENSOR_FIELDS = ["dtype", "shape", "data_offsets"]


@examples(200)
@given(tensor=st.sampled_from(["w", "b"]), field=st.sampled_from(TENSOR_FIELDS), value=hostile_values().map(json_safe))
@example(tensor="w", field="dtype", value=["F32"]).via("was TypeError: unhashable type: 'list'")
@example(tensor="w", field="shape", value=[2**62, 2**62, 0]).via("an empty tensor of absurd dimensions")
@example(tensor="w", field="shape", value=[0] * 100 + [2**40]).via("more dimensions than numpy holds")
@example(tensor="b", field="data_offsets", value=[24, 24 + 2**64])
def test_one_hostile_tensor_entry(tensor, field, value):
    header = json.loads(json.dumps(GOOD_HEADER))
    header[tensor][field] = value
    check_file(with_header(header, GOOD_BODY))


@examples(100)
@given(header=hostile_values(max_leaves=12).map(json_safe), body=st.binary(max_size=64), pad=st.booleans())
@example(header={"__metadata__": {"a": 1}}, body=b"", pad=True)
@example(header={"__metadata__": [], "w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, body=b"1234", pad=True)
def test_any_json_header(header, body, pad):
    check_file(with_header(header, body, pad))


@examples(100)
@given(raw=broken_bytes, length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
@example(raw=b"[" * 100_000, length=None).via("was RecursionError")
@example(raw=b'{"w": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 4]}}', length=None)
@example(raw=b'{"w": 1, "w": 2}', length=None)
def test_any_header_bytes(raw, length):
    check_file(struct.pack("<Q", len(raw) if length is None else length) + raw)


@examples(60)
@given(cut=st.integers(0, len(GOOD)), extra=st.binary(max_size=16))
def test_a_cut_or_padded_model_file(cut, extra):
    check_file(GOOD[:cut] + extra)

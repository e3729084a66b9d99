"""Safetensors written tensor by tensor and read with plain file reads (no memory maps)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from flare_provider.wire.tensors import TensorFile, TensorFormatError, dump_bytes, load_file, save_file

TENSORS = {
    "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    "scalar": np.array(2.5, np.float64),
    "empty": np.zeros((0, 3), np.float16),
    "mask": np.array([True, False, True]),
    "steps": np.array([7, -1], np.int64),
    "strided": np.arange(20, dtype=np.uint8)[::3],  # not contiguous
    "big_endian": np.arange(6, dtype=">f4").reshape(3, 2),
}


def test_streamed_file_reads_back_identically_with_the_safetensors_library(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, path, {"flare.result_kind": "weights"})
    theirs = safetensors.numpy.load_file(str(path))
    ours = load_file(path)
    assert set(theirs) == set(ours) == set(TENSORS)
    for name, expected in TENSORS.items():
        for loaded in (theirs[name], ours[name]):
            assert loaded.shape == expected.shape and loaded.dtype == expected.dtype.newbyteorder("=")
            np.testing.assert_array_equal(loaded, expected)
    assert path.read_bytes() == dump_bytes(TENSORS, {"flare.result_kind": "weights"})
    assert safetensors.numpy.load(dump_bytes({})) == {}


def test_files_of_the_safetensors_library_read_by_tensor_rows_and_blocks(tmp_path):
    path = tmp_path / "theirs.safetensors"
    weight = np.random.default_rng(1).standard_normal((10, 7)).astype(np.float32)
    safetensors.numpy.save_file({"w": weight, "b": np.ones(3, np.float16)}, str(path))
    with TensorFile(path) as f:
        np.testing.assert_array_equal(f["w"], weight)
        np.testing.assert_array_equal(f.read("w", slice(3, 6)), weight[3:6])
        seen = np.concatenate([values.copy() for _, values in f.blocks("w", 16)])
        np.testing.assert_array_equal(seen, weight.reshape(-1))
        path.unlink()  # an open TensorFile still reads a deleted file
        np.testing.assert_array_equal(f["b"], np.ones(3, np.float16))


def test_a_tensor_file_is_copied_tensor_by_tensor(tmp_path):
    save_file(TENSORS, tmp_path / "a.safetensors")
    with TensorFile(tmp_path / "a.safetensors") as source:
        save_file(source, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def raw_file(header: dict, data: bytes, pad: bool = True) -> bytes:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED = {
    "truncated data": raw_file({"a": F32}, bytes(4)),
    "trailing bytes": raw_file({"a": F32}, bytes(12)),
    "gap": raw_file({"a": F32, "b": {**F32, "data_offsets": [12, 20]}}, bytes(20)),
    "overlap": raw_file({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, bytes(12)),
    "size mismatch": raw_file({"a": {**F32, "shape": [3]}}, bytes(8)),
    "unknown dtype": raw_file({"a": {**F32, "dtype": "X9"}}, bytes(8)),
    "negative shape": raw_file({"a": {**F32, "shape": [-2]}}, bytes(8)),
    "not json": struct.pack("<Q", 8) + b"not json",
    "header past the end": struct.pack("<Q", 1 << 40) + b"{}",
    "too short": b"\x01\x00",
    "duplicate name": struct.pack("<Q", 112)
    + b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    + b" " * 6
    + bytes(8),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_are_refused(case, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(MALFORMED[case])
    with pytest.raises(TensorFormatError, match="not valid safetensors"):
        TensorFile(path)

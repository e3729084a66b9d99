"""Counting an update's NaN and infinite values as its bytes arrive (FiniteScan), and the
aggregator taking those counts instead of reading the file again."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flare_provider.aggregation import UpdateRejected, make_aggregator
from flare_provider.aggregation.validation import validate_update
from flare_provider.wire.finite_scan import FiniteScan
from flare_provider.wire.tensors import dump_bytes

DTYPES = [np.float16, np.float32, np.float64, np.int32, np.uint8, np.bool_]


@st.composite
def models(draw):
    """Tensors of several dtypes, floating ones with NaN and infinities here and there."""
    tensors = {}
    for index in range(draw(st.integers(1, 5))):
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        size = draw(st.integers(0, 40))
        values = np.arange(size).astype(dtype)
        if dtype.kind == "f" and size:
            for position in draw(st.lists(st.integers(0, size - 1), max_size=4)):
                values[position] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        tensors[f"layer{index}"] = values.reshape(-1, 1) if size % 2 else values
    return tensors


def fed(data: bytes, cuts: list[int]) -> FiniteScan:
    scan = FiniteScan()
    scan.start(len(data))
    position = 0
    for cut in sorted(cuts) + [len(data)]:
        scan.feed(memoryview(data)[position:cut])
        position = max(position, cut)
    return scan


@settings(max_examples=300, deadline=None)
@given(tensors=models(), cuts=st.lists(st.integers(0, 2000), max_size=30), metadata=st.booleans())
def test_the_counts_are_numpys_however_the_bytes_are_cut_into_chunks(tensors, cuts, metadata):
    data = dump_bytes(tensors, metadata={"note": "x" * 13} if metadata else None)
    expected = {name: int(v.size - np.count_nonzero(np.isfinite(v))) for name, v in tensors.items() if v.dtype.kind == "f"}
    assert fed(data, [c for c in cuts if c < len(data)]).counts() == expected


def test_a_scan_without_every_byte_or_with_a_bad_header_has_no_counts():
    data = dump_bytes({"w": np.array([1.0, np.nan], np.float32)})
    assert FiniteScan().counts() is None  # never started
    half = FiniteScan()
    half.start(len(data))
    half.feed(data[: len(data) - 3])
    assert half.counts() is None
    abandoned = fed(data, [10])
    abandoned.abandon()
    assert abandoned.counts() is None
    assert fed(b"\x05" + data[1:], []).counts() is None  # header length wrong: not parsed
    assert fed(bytes(8) + data[8:], []).counts() is None  # a header of length 0: refused, not looped on
    assert fed(bytes(8) + data[8:], [3, 8, 9]).counts() is None
    assert fed(data[:8] + b"[" + data[9:], []).counts() is None  # header not JSON
    restarted = fed(b"garbage" * 3, [])
    restarted.start(len(data))
    restarted.feed(data)
    assert restarted.counts() == {"w": 1}


def test_counts_given_to_the_aggregator_are_used_and_name_the_tensor(tmp_path):
    global_weights = {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}
    path = tmp_path / "update.safetensors"
    path.write_bytes(dump_bytes({"w": np.ones(4, np.float32), "b": np.ones(2, np.float32)}))
    aggregator = make_aggregator("fedavg")
    aggregator.begin_round(global_weights, 1, ["site-a", "site-b"])
    # The counts say what the bytes held as they arrived; the file is not read to count again.
    with pytest.raises(UpdateRejected, match=r"site 'site-a' rejected: tensor 'b': 2 non-finite value\(s\)"):
        aggregator.add("site-a", path, 10, nonfinite={"w": 0, "b": 2})
    aggregator.add("site-b", path, 10, nonfinite={"w": 0, "b": 0})
    assert aggregator.finish()["w"].tolist() == [1.0] * 4


def test_counts_that_miss_a_tensor_are_not_trusted_the_file_is_counted(tmp_path):
    path = tmp_path / "update.safetensors"
    path.write_bytes(dump_bytes({"w": np.array([1.0, np.inf], np.float32), "b": np.ones(2, np.float32)}))
    spec = {"w": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
    with pytest.raises(UpdateRejected, match=r"tensor 'w': 1 non-finite value"):
        validate_update(spec, path, site="s", nonfinite={"b": 0})
    with pytest.raises(UpdateRejected, match=r"tensor 'w': 1 non-finite value"):
        validate_update(spec, path, site="s")

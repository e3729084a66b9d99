"""Bad updates are refused with a message naming site, tensor and problem; the round goes on."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from flare_provider.aggregation import (
    AggregationError,
    FedAvg,
    ModelSpec,
    UpdateRejected,
    make_aggregator,
    validate_update,
)

GLOBAL = {"fc.weight": np.zeros((2, 3), np.float32), "fc.bias": np.zeros(2, np.float32)}


def good(value: float) -> dict[str, np.ndarray]:
    return {"fc.weight": np.full((2, 3), value, np.float32), "fc.bias": np.full(2, value, np.float32)}


def with_nan():
    u = good(1)
    u["fc.weight"][1, 2] = np.nan
    return u


def with_inf():
    u = good(1)
    u["fc.bias"][0] = -np.inf
    return u


def bfloat16_file(path):
    """A hand-written safetensors file holding a BF16 tensor, which numpy has no dtype for."""
    header = {
        "fc.weight": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
        "fc.bias": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(20))


BAD = {
    "nan": (with_nan, "tensor 'fc.weight': 1 non-finite value"),
    "inf": (with_inf, "tensor 'fc.bias': 1 non-finite value"),
    "shape": (lambda: {**good(1), "fc.bias": np.ones(3, np.float32)}, "tensor 'fc.bias': shape [3], expected [2]"),
    "dtype": (lambda: {**good(1), "fc.bias": np.ones(2, np.float64)},
              "tensor 'fc.bias': dtype float64, expected float32"),
    "extra": (lambda: {**good(1), "fc2.weight": np.ones(1, np.float32)}, "unexpected tensors 'fc2.weight'"),
    "missing": (lambda: {"fc.weight": good(1)["fc.weight"]}, "missing tensors 'fc.bias'"),
    "bf16": (bfloat16_file, "tensor 'fc.weight': dtype BF16 cannot be aggregated; expected float32"),
    "garbage": (lambda: b"this is not a safetensors file at all", "not a readable safetensors file"),
    "oversized": (lambda: (good(1), {"padding": "x" * (2 << 20)}), "bytes, more than the"),
}


def write_bad(case, update_file, tmp_path):
    made = BAD[case][0]
    if made is bfloat16_file:
        path = tmp_path / "bf16.safetensors"
        made(path)
        return path
    content = made()
    if isinstance(content, bytes):
        path = tmp_path / "garbage.safetensors"
        path.write_bytes(content)
        return path
    if isinstance(content, tuple):
        return update_file("bad", content[0], metadata=content[1])
    return update_file("bad", content)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedadam", "median"])
@pytest.mark.parametrize("bad_first", [True, False], ids=["bad-before-its-turn", "bad-in-its-turn"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_update_is_rejected_and_round_goes_on(case, bad_first, algorithm, update_file, tmp_path):
    agg = make_aggregator(algorithm)
    agg.begin_round(GLOBAL, 4, ["hospital-a", "hospital-b", "hospital-c"])
    bad = write_bad(case, update_file, tmp_path)
    if not bad_first:
        agg.add("hospital-a", update_file("a", good(1)), 10)
    with pytest.raises(UpdateRejected) as caught:
        agg.add("hospital-b", bad, 10)
    message = str(caught.value)
    assert message.startswith("update from site 'hospital-b' rejected: ")
    assert BAD[case][1] in message
    assert caught.value.site == "hospital-b"
    if bad_first:
        agg.add("hospital-a", update_file("a", good(1)), 10)
    agg.add("hospital-c", update_file("c", good(3)), 10)
    new = agg.finish()
    assert agg.last_round.rejected == {"hospital-b": message}
    assert sorted(agg.last_round.accepted) == ["hospital-a", "hospital-c"]
    if algorithm != "fedadam":
        np.testing.assert_array_equal(new["fc.weight"], np.full((2, 3), 2, np.float32))
    assert all(np.isfinite(v).all() for v in new.values())


@pytest.mark.parametrize("case", ["nan", "inf", "shape", "dtype", "extra", "missing"])
def test_validate_update_in_memory(case):
    with pytest.raises(UpdateRejected, match="update from site 'lab' rejected"):
        validate_update(GLOBAL, BAD[case][0](), site="lab")
    validate_update(ModelSpec.of(GLOBAL), good(1), site="lab")


def test_validate_update_file_and_size_bound(update_file):
    path = update_file("ok", good(1))
    validate_update(GLOBAL, path, site="lab")
    with pytest.raises(UpdateRejected, match=r"more than the 100 an update"):
        validate_update(GLOBAL, path, site="lab", max_bytes=100)
    with pytest.raises(UpdateRejected, match="cannot read the update file"):
        validate_update(GLOBAL, path.with_name("gone.safetensors"), site="lab")


def test_max_update_bytes_setting(update_file):
    agg = FedAvg(max_update_bytes=64)
    agg.begin_round(GLOBAL, 0, ["a"])
    with pytest.raises(UpdateRejected, match="more than the 64"):
        agg.add("a", update_file("a", good(1)), 1)


@pytest.mark.parametrize("num_samples", [0, -3, 2.5, True, "10", None])
def test_bad_sample_counts(num_samples, update_file):
    agg = FedAvg()
    agg.begin_round(GLOBAL, 0, ["a", "b"])
    with pytest.raises(UpdateRejected, match="num_samples must be a positive integer"):
        agg.add("a", update_file("a", good(1)), num_samples)
    agg.add("b", update_file("b", good(2)), np.int64(4))
    np.testing.assert_array_equal(agg.finish()["fc.bias"], [2, 2])


def test_unknown_kind_unexpected_site_and_second_report(update_file):
    agg = FedAvg()
    agg.begin_round(GLOBAL, 7, ["a", "b"])
    path = update_file("a", good(1))
    with pytest.raises(UpdateRejected, match="kind 'delta' is not one of weights, diff"):
        agg.add("a", path, 1, kind="delta")
    with pytest.raises(UpdateRejected, match="site 'mallory' rejected: is not a site of round 7"):
        agg.add("mallory", path, 1)
    agg.add("b", path, 1)
    with pytest.raises(UpdateRejected, match="already reported in round 7"):
        agg.add("b", path, 1)
    with pytest.raises(UpdateRejected, match="already reported"):
        agg.add("a", path, 1)  # a was rejected; it does not get a second try this round
    assert agg.status.accepted == {"b": 1} and list(agg.status.rejected) == ["a"]
    agg.finish()


def test_no_accepted_update_fails_the_round_clearly(update_file, tmp_path):
    agg = FedAvg()
    with pytest.raises(AggregationError, match="begin_round"):
        agg.add("a", update_file("a", good(1)), 1)
    agg.begin_round(GLOBAL, 2, ["a", "b"])
    with pytest.raises(UpdateRejected):
        agg.add("a", update_file("nan", with_nan()), 1)
    expected = r"round 2: no update was accepted \(rejected: \['a'\]; missing: \['b'\]\)"
    with pytest.raises(AggregationError, match=expected):
        agg.finish()
    with pytest.raises(AggregationError, match="no round in progress"):
        agg.finish()

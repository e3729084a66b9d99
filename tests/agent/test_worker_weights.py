"""A task's weights on disk: read straight into arrays (torch tensors sharing them), written
tensor by tensor; bfloat16, which numpy cannot hold, still round-trips through torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as reference_load

from site_agent.worker.weights import WeightsError, load_weights, save_weights


def test_numpy_and_torch_weights_round_trip_with_metadata(tmp_path):
    weights = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.array(7, np.int64), "m": np.ones(3, bool)}
    path = tmp_path / "result.safetensors"
    save_weights(path, weights, {"flare.result_kind": "weights"})
    assert {k: v.tolist() for k, v in reference_load(str(path)).items()} == {k: v.tolist() for k, v in weights.items()}
    loaded = load_weights(path)
    assert all(np.array_equal(loaded[k], weights[k]) and loaded[k].dtype == weights[k].dtype for k in weights)
    as_torch = load_weights(path, "torch")
    assert as_torch["w"].dtype == torch.float32 and torch.equal(as_torch["w"], torch.from_numpy(weights["w"]))
    # what a trainer hands back as torch tensors (one needing grad, one not contiguous) is written as is
    save_weights(path, {"w": as_torch["w"].t().requires_grad_(False), "n": as_torch["n"], "m": weights["m"]})
    again = load_weights(path)
    np.testing.assert_array_equal(again["w"], weights["w"].T)


def test_bfloat16_goes_through_torch_and_numpy_says_why_not(tmp_path):
    path = tmp_path / "bf16.safetensors"
    values = torch.linspace(-2, 2, 10, dtype=torch.bfloat16)
    save_weights(path, {"b": values, "f": torch.zeros(2)})
    loaded = load_weights(path, "torch")
    assert loaded["b"].dtype == torch.bfloat16 and torch.equal(loaded["b"], values)
    with pytest.raises(WeightsError, match="BF16 have no numpy dtype"):
        load_weights(path)
    with pytest.raises(WeightsError, match="unknown tensor_format 'jax'"):
        load_weights(path, "jax")


def test_a_damaged_file_is_refused_by_name(tmp_path):
    path = tmp_path / "broken.safetensors"
    save_weights(path, {"w": np.ones(100, np.float32)})
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(WeightsError, match="broken.safetensors: cannot load weights"):
        load_weights(path)

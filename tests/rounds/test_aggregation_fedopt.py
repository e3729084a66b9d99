"""FedAdam, FedYogi, FedAdagrad against the update rules worked out by hand, and exact resumes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flare_provider.aggregation import FedAdagrad, FedAdam, FedYogi, make_aggregator

LR, BETA1, BETA2, TAU = 0.1, 0.9, 0.99, 0.01


def run_rounds(agg, update_file, rounds):
    """Each round: sites a (3 samples) and b (1 sample) report full weights.

    ``rounds`` lists (a's value, b's value) per round for the single tensor ``x``;
    an int64 counter rides along to show integer tensors are averaged, not stepped.
    """
    weights = {"x": np.array([1.0, -2.0], np.float32), "count": np.array(7, np.int64)}
    history = []
    for number, (a, b) in enumerate(rounds):
        agg.begin_round(weights, number, ["a", "b"])
        agg.add("a", update_file(f"a{number}", {"x": np.array(a, np.float32), "count": np.array(9, np.int64)}), 3)
        agg.add("b", update_file(f"b{number}", {"x": np.array(b, np.float32), "count": np.array(13, np.int64)}), 1)
        weights = agg.finish()
        history.append(weights)
    return history


def by_hand(second_moment, rounds):
    """The paper's Algorithm 2 on plain Python floats, one coordinate at a time."""
    xs = [1.0, -2.0]
    m = [0.0, 0.0]
    v = [TAU**2, TAU**2]
    out = []
    for a, b in rounds:
        for i in range(2):
            x = float(np.float32(xs[i]))
            delta = (3 * (float(np.float32(a[i])) - x) + 1 * (float(np.float32(b[i])) - x)) / 4
            m[i] = BETA1 * m[i] + (1 - BETA1) * delta
            v[i] = second_moment(v[i], delta * delta)
            xs[i] = x + LR * m[i] / (math.sqrt(v[i]) + TAU)
        out.append(list(xs))
    return out


# Three rounds; in the third the change is small, so Yogi's v shrinks (sign +1) after growing.
ROUNDS = [([1.5, -2.5], [0.5, -1.0]), ([1.25, -2.0], [2.0, -3.0]), ([1.2, -2.1], [1.2, -2.1])]

ALGORITHMS = {
    "fedadam": (FedAdam, lambda v, d2: BETA2 * v + (1 - BETA2) * d2),
    "fedyogi": (FedYogi, lambda v, d2: v - (1 - BETA2) * d2 * math.copysign(1.0, v - d2) if v != d2 else v),
    "fedadagrad": (FedAdagrad, lambda v, d2: v + d2),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_steps_match_hand_computation(name, update_file):
    cls, rule = ALGORITHMS[name]
    kwargs = {"server_lr": LR, "beta1": BETA1, "tau": TAU}
    if cls is not FedAdagrad:
        kwargs["beta2"] = BETA2
    history = run_rounds(cls(**kwargs), update_file, ROUNDS)
    expected = by_hand(rule, ROUNDS)
    for step, (got, want) in enumerate(zip(history, expected), start=1):
        np.testing.assert_allclose(got["x"], np.array(want, np.float32), rtol=1e-6, err_msg=f"step {step}")
        assert got["x"].dtype == np.float32
        assert got["count"] == 10  # (3 * 9 + 13) / 4: averaged, no optimizer step


def test_fedadam_first_step_worked_example(update_file):
    # x = 1, sites 1.5 (3 samples) and 0.5 (1 sample): delta = (1.5 + -0.5) / 4 = 0.25
    # m = 0.1 * 0.25 = 0.025; v = 0.99 * 1e-4 + 0.01 * 0.0625 = 0.000724
    # x = 1 + 0.1 * 0.025 / (sqrt(0.000724) + 0.01) = 1 + 0.0025 / 0.0369072 = 1.0677373
    agg = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.01)
    (new,) = run_rounds(agg, update_file, [([1.5, -2.0], [0.5, -2.0])])
    assert new["x"][0] == pytest.approx(1.0677373, rel=1e-6)
    assert new["x"][1] == pytest.approx(-2.0, abs=1e-7)  # no change, no step
    tensors, meta = agg.state()
    assert tensors["m/x"][0] == pytest.approx(0.025) and tensors["v/x"][0] == pytest.approx(0.000724)
    assert sorted(tensors) == ["m/x", "v/x"] and meta["steps"] == 1


def save_and_reload(agg, tmp_path):
    """Through real files, as the snapshot store keeps them: safetensors and JSON."""
    tensors, meta = agg.state()
    save_file(tensors, str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(meta))
    return load_file(str(tmp_path / "state.safetensors")), json.loads((tmp_path / "state.json").read_text())


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_resume_from_saved_state_continues_exactly(name, update_file, tmp_path):
    rng = np.random.default_rng(3)
    global_weights = {
        "a": rng.standard_normal((6, 5)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
    }
    updates = [
        {s: update_file(f"{s}{r}", {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32)
                                    for k, v in global_weights.items()}) for s in ("x", "y")}
        for r in range(4)
    ]

    def rounds(agg, weights, numbers):
        for r in numbers:
            agg.begin_round(weights, r, ["x", "y"])
            agg.add("y", updates[r]["y"], 10 + r)
            agg.add("x", updates[r]["x"], 20)
            weights = agg.finish()
        return weights

    straight = rounds(make_aggregator(name, server_lr=0.05), global_weights, range(4))

    first = make_aggregator(name, server_lr=0.05)
    halfway = rounds(first, global_weights, range(2))
    save_file(halfway, str(tmp_path / "model.safetensors"))
    tensors, meta = save_and_reload(first, tmp_path)
    resumed = make_aggregator(name, server_lr=0.05)
    resumed.load_state(tensors, meta)
    end = rounds(resumed, load_file(str(tmp_path / "model.safetensors")), range(2, 4))

    for key in straight:
        assert straight[key].tobytes() == end[key].tobytes()
    assert resumed.state()[1]["steps"] == 4


def test_state_must_match_algorithm_and_model(update_file):
    adam = FedAdam()
    run_rounds(adam, update_file, ROUNDS[:1])
    tensors, meta = adam.state()
    with pytest.raises(ValueError, match="'fedadam', not 'fedyogi'"):
        FedYogi().load_state(tensors, meta)
    with pytest.raises(ValueError, match="m/<tensor> and v/<tensor>"):
        FedAdam().load_state({"m/x": tensors["m/x"]}, meta)
    other = FedAdam()
    other.load_state(tensors, meta)
    with pytest.raises(ValueError, match="shape"):
        other.begin_round({"x": np.zeros(3, np.float32), "count": np.array(1)}, 1, ["a"])
    with pytest.raises(ValueError, match=r"does not match this model: no moments for tensors \['y'\], "
                                         r"moments for unknown tensors \['x'\]"):
        other.begin_round({"y": np.zeros(2, np.float32)}, 1, ["a"])
    assert other.status is None  # no half-begun round is left behind
    with pytest.raises(ValueError, match="no tensor state"):
        make_aggregator("fedavg").load_state(tensors, {"algorithm": "fedavg"})


def test_fedavg_state_round_trip_is_empty():
    tensors, meta = make_aggregator("fedavg").state()
    assert tensors == {} and meta == {"algorithm": "fedavg", "parameters": {}}
    make_aggregator("fedavg").load_state(tensors, meta)

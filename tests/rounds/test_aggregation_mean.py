"""FedAvg and FedProx: sample-weighted means, arrival-order independence, dropped sites."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from flare_provider.aggregation import FedAvg, FedProx, make_aggregator


def f32(*values) -> np.ndarray:
    return np.array(values, np.float32)


def test_fedavg_weights_by_sample_count(update_file):
    global_weights = {"w": f32(0, 0, 0, 0), "b": np.array(1.0, np.float32), "steps": np.array(10, np.int64)}
    a = update_file("a", {"w": f32(1, 2, 3, 4), "b": np.array(2.0, np.float32), "steps": np.array(14, np.int64)})
    b = update_file("b", {"w": f32(5, 6, 7, 8), "b": np.array(6.0, np.float32), "steps": np.array(11, np.int64)})
    agg = FedAvg()
    agg.begin_round(global_weights, 1, ["a", "b"])
    agg.add("a", a, 1)
    agg.add("b", b, 3)
    new = agg.finish()
    # (1 * [1, 2, 3, 4] + 3 * [5, 6, 7, 8]) / 4 = [4, 5, 6, 7]; (2 + 18) / 4 = 5; (14 + 33) / 4 = 11.75 -> 12
    np.testing.assert_array_equal(new["w"], f32(4, 5, 6, 7))
    assert new["b"].shape == () and new["b"] == np.float32(5.0)
    assert new["steps"].dtype == np.int64 and new["steps"] == 12
    assert {k: v.dtype for k, v in new.items()} == {k: v.dtype for k, v in global_weights.items()}
    assert agg.last_round.as_dict() == {
        "round": 1, "accepted": {"a": 1, "b": 3}, "rejected": {}, "missing": [], "num_samples": 4,
    }


def test_diffs_and_full_weights_mix(update_file):
    global_weights = {"w": f32(1, 1)}
    agg = make_aggregator("fedavg")
    agg.begin_round(global_weights, 0, ["a", "b"])
    agg.add("a", update_file("a", {"w": f32(2, -2)}), 1, kind="diff")  # weights 3, -1
    agg.add("b", update_file("b", {"w": f32(3, 3)}), 1, kind="weights")
    np.testing.assert_array_equal(agg.finish()["w"], f32(3, 1))


def test_float16_model_is_averaged_in_float64(update_file):
    # In float16, 2048 + 1 rounds back to 2048; the float64 accumulator keeps the 0.5s.
    global_weights = {"w": np.array([2048, 0], np.float16)}
    agg = FedAvg()
    agg.begin_round(global_weights, 0, ["a", "b"])
    agg.add("a", update_file("a", {"w": np.array([2048, 1], np.float16)}), 1)
    agg.add("b", update_file("b", {"w": np.array([2052, 2], np.float16)}), 1)
    new = agg.finish()["w"]
    assert new.dtype == np.float16
    np.testing.assert_array_equal(new, np.array([2050, 1.5], np.float16))


def test_same_bytes_for_every_arrival_order(update_file):
    rng = np.random.default_rng(7)
    shape = {"conv": (8, 3, 3, 3), "fc": (10, 72), "bias": (10,)}
    global_weights = {k: rng.standard_normal(s).astype(np.float32) for k, s in shape.items()}
    sites = ["hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e"]
    samples = {"hospital-a": 120, "hospital-b": 7, "hospital-c": 3001, "hospital-d": 64, "hospital-e": 1}
    files = {
        s: update_file(s, {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in global_weights.items()})
        for s in sites
    }
    reporting = sites[:4]  # hospital-e never reports: dropped at finish()
    results = set()
    for order in itertools.permutations(reporting):
        agg = FedAvg()
        agg.begin_round(global_weights, 3, sites)
        for site in order:
            agg.add(site, files[site], samples[site])
        new = agg.finish()
        assert agg.last_round.missing == ["hospital-e"]
        results.add(b"".join(new[k].tobytes() for k in sorted(new)))
    assert len(results) == 1, "the aggregate depends on the order the sites reported in"

    # ...and it is the weighted mean.
    from safetensors.numpy import load_file

    total = sum(samples[s] for s in reporting)
    for name in global_weights:
        expected = sum(samples[s] * load_file(files[s])[name].astype(np.float64) for s in reporting) / total
        np.testing.assert_allclose(new[name], expected, rtol=1e-6, atol=1e-6)


def test_dropped_sites_are_skipped_and_waiting_updates_folded(update_file, tmp_path):
    global_weights = {"w": f32(0, 0)}
    agg = FedAvg(spill_dir=tmp_path / "spill")
    agg.begin_round(global_weights, 2, ["a", "b", "c"])
    # c arrives first and must wait on disk for a and b; b never reports.
    agg.add("c", update_file("c", {"w": f32(4, 8)}), 1)
    assert len(list((tmp_path / "spill").rglob("*.safetensors"))) == 1
    agg.add("a", update_file("a", {"w": f32(2, 2)}), 1)
    assert agg.status.missing == ["b"]
    np.testing.assert_array_equal(agg.finish()["w"], f32(3, 5))
    assert list((tmp_path / "spill").iterdir()) == []  # the round's spill folder is gone


def test_caller_may_delete_its_file_after_add(update_file):
    agg = FedAvg()
    agg.begin_round({"w": f32(0)}, 0, ["a", "b"])
    late = update_file("b", {"w": f32(2)})
    agg.add("b", late, 1)  # waits for a, as a copy
    late.unlink()
    agg.add("a", update_file("a", {"w": f32(4)}), 1)
    np.testing.assert_array_equal(agg.finish()["w"], f32(3))


def test_fedprox_sends_mu_and_averages_like_fedavg(update_file):
    agg = FedProx(mu=0.05)
    assert agg.trainer_config() == {"fedprox_mu": 0.05}
    assert FedAvg().trainer_config() == {}
    agg.begin_round({"w": f32(0)}, 0, ["a", "b"])
    agg.add("a", update_file("a", {"w": f32(1)}), 3)
    agg.add("b", update_file("b", {"w": f32(5)}), 1)
    np.testing.assert_array_equal(agg.finish()["w"], f32(2))


def test_rounds_follow_each_other(update_file):
    agg = FedAvg()
    weights = {"w": f32(0)}
    for round_number in range(3):
        agg.begin_round(weights, round_number, ["a"])
        agg.add("a", update_file(f"a{round_number}", {"w": weights["w"] + 1}), 5)
        weights = agg.finish()
    np.testing.assert_array_equal(weights["w"], f32(3))


@pytest.mark.parametrize(
    "args, problem",
    [
        (({"w": f32(0)}, -1, ["a"]), "round_number"),
        (({"w": f32(0)}, 0, []), "expected_sites"),
        (({"w": f32(0)}, 0, ["a", "a"]), "twice"),
        (({}, 0, ["a"]), "at least one tensor"),
        (({"w": [1.0]}, 0, ["a"]), "not a numpy array"),
        (({"w": np.array(["x"])}, 0, ["a"]), "dtype"),
    ],
)
def test_begin_round_refuses_bad_arguments(args, problem):
    with pytest.raises(ValueError, match=problem):
        FedAvg().begin_round(*args)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedadam"])
def test_in_place_fold_gives_the_same_bits_for_every_order_and_a_file_backed_global(
    algorithm, update_file, tmp_path, monkeypatch
):
    """Blocks smaller than the tensors, mixed kinds, and the global model read from a file."""
    from flare_provider.aggregation import mean
    from flare_provider.wire.tensors import TensorFile, save_file

    monkeypatch.setattr(mean, "BLOCK", 5)  # tensors span several blocks, the last one partial
    rng = np.random.default_rng(11)
    global_weights = {"w": rng.standard_normal((4, 3)).astype(np.float32), "n": np.array(9, np.int64)}
    save_file(global_weights, tmp_path / "global.safetensors")
    sites = {"a": ("weights", 3), "b": ("diff", 40), "c": ("weights", 7)}
    files = {}
    for s, (kind, _) in sites.items():
        update = {"w": rng.standard_normal((4, 3)).astype(np.float32), "n": np.array(len(s), np.int64)}
        files[s] = update_file(s, update)
    results = set()
    for order in itertools.permutations(sites):
        for source in (global_weights, TensorFile(tmp_path / "global.safetensors")):
            agg = make_aggregator(algorithm)
            agg.begin_round(source, 1, list(sites))
            for site in order:
                agg.add(site, files[site], sites[site][1], kind=sites[site][0])
            new = agg.finish()
            results.add(b"".join(new[k].tobytes() for k in sorted(new)))
    assert len(results) == 1, "the aggregate depends on the arrival order or on where the global model is"
    if algorithm == "fedavg":
        from safetensors.numpy import load_file

        total = sum(n for _, n in sites.values())
        expected = sum(
            n * (load_file(files[s])["w"].astype(np.float64) + (global_weights["w"] if kind == "diff" else 0))
            for s, (kind, n) in sites.items()
        ) / total
        np.testing.assert_allclose(new["w"], expected, rtol=1e-6)


def test_a_handed_over_file_is_moved_not_copied(update_file, tmp_path):
    agg = FedAvg(spill_dir=tmp_path / "spill")
    agg.begin_round({"w": f32(0, 0)}, 1, ["a", "b"])
    late = update_file("b", {"w": f32(4, 8)})
    agg.add("b", late, 1, move=True)  # waits for a: moved into the spill folder
    assert not late.exists() and len(list((tmp_path / "spill").rglob("*.safetensors"))) == 1
    kept = update_file("a", {"w": f32(2, 2)})
    agg.add("a", kept, 1, move=True)  # folded at once: nothing to move
    assert kept.exists()
    np.testing.assert_array_equal(agg.finish()["w"], f32(3, 5))


def test_a_bad_update_in_its_turn_leaves_the_sums_untouched(update_file):
    """The non-finite value is in the last tensor: every earlier one was checked, none folded."""
    global_weights = {"a": f32(0, 0), "z": f32(0)}
    agg = FedAvg()
    agg.begin_round(global_weights, 1, ["s1", "s2"])
    with pytest.raises(Exception, match="non-finite"):
        agg.add("s1", update_file("s1", {"a": f32(100, 100), "z": f32(np.inf)}), 5)
    agg.add("s2", update_file("s2", {"a": f32(1, 2), "z": f32(3)}), 1)
    new = agg.finish()
    np.testing.assert_array_equal(new["a"], f32(1, 2))
    np.testing.assert_array_equal(new["z"], f32(3))

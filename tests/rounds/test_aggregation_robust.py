"""Coordinate-wise median and trimmed mean, computed block by block from spilled files."""

from __future__ import annotations

import numpy as np
import pytest

from flare_provider.aggregation import CoordinateMedian, TrimmedMean, make_aggregator

ZERO = {"w": np.zeros(3, np.float32)}


def aggregate(agg, update_file, values, global_weights=ZERO, samples=None, kind="weights"):
    sites = [f"s{i}" for i in range(len(values))]
    agg.begin_round(global_weights, 0, sites)
    for site, value in zip(reversed(sites), reversed(values)):
        agg.add(site, update_file(site, {"w": np.array(value, np.float32)}), (samples or {}).get(site, 1), kind)
    return agg.finish()["w"]


def test_median_of_an_odd_number_of_sites(update_file):
    values = [[1, 10, 0], [100, 20, 0], [3, -5, 0], [-50, 30, 0], [2, 40, 7]]
    # per coordinate: sorted [-50, 1, 2, 3, 100] -> 2; [-5, 10, 20, 30, 40] -> 20; [0, 0, 0, 0, 7] -> 0
    np.testing.assert_array_equal(aggregate(CoordinateMedian(), update_file, values), [2, 20, 0])


def test_median_of_an_even_number_is_the_mean_of_the_middle_two(update_file):
    values = [[1, 0, 0], [100, 0, 0], [3, 0, 0], [-50, 0, 0]]
    # sorted [-50, 1, 3, 100] -> (1 + 3) / 2
    np.testing.assert_array_equal(aggregate(CoordinateMedian(), update_file, values), [2, 0, 0])


def test_median_ignores_sample_counts(update_file):
    values = [[0, 0, 0], [1, 1, 1], [1000, 1000, 1000]]
    result = aggregate(CoordinateMedian(), update_file, values, samples={"s2": 10**6})
    np.testing.assert_array_equal(result, [1, 1, 1])


def test_trimmed_mean_drops_the_extremes(update_file):
    values = [[1, 10, 0], [100, 20, 0], [3, -5, 0], [-50, 30, 0], [2, 40, 7]]
    # trim 0.2 of 5 sites: drop 1 at each end. [1, 2, 3] -> 2; [10, 20, 30] -> 20; [0, 0, 0] -> 0
    np.testing.assert_array_equal(aggregate(TrimmedMean(trim=0.2), update_file, values), [2, 20, 0])
    # trim 0.1 of 5 sites drops nothing: the plain mean
    np.testing.assert_allclose(aggregate(TrimmedMean(trim=0.1), update_file, values), [11.2, 19, 1.4], rtol=1e-6)


def test_diffs_are_relative_to_the_global_model(update_file):
    base = {"w": np.array([10, 10, 10], np.float32)}
    values = [[1, -1, 0], [2, -2, 0], [9, -9, 1]]
    result = aggregate(make_aggregator("median"), update_file, values, global_weights=base, kind="diff")
    np.testing.assert_array_equal(result, [12, 8, 10])


@pytest.mark.parametrize("cls, kwargs, reduce", [
    (CoordinateMedian, {}, lambda stack: np.median(stack, axis=0)),
    (TrimmedMean, {"trim": 0.25}, lambda stack: np.sort(stack, axis=0)[2:-2].mean(axis=0)),
])
def test_block_by_block_equals_whole_tensors(cls, kwargs, reduce, update_file):
    """A tiny block budget forces one row per block; scalars and integers come along."""
    rng = np.random.default_rng(11)
    global_weights = {
        "matrix": rng.standard_normal((37, 3, 2)).astype(np.float32),
        "scalar": np.array(0.5, np.float32),
        "counter": np.array([4, 9], np.int32),
    }
    sites = [f"site-{i}" for i in range(9)]
    updates = {
        s: {k: np.asarray(v + rng.standard_normal(v.shape) * 3, v.dtype) for k, v in global_weights.items()}
        for s in sites
    }
    agg = cls(block_bytes=64, **kwargs)
    agg.begin_round(global_weights, 5, sites)
    for site in sites:
        agg.add(site, update_file(site, updates[site]), 1)
    new = agg.finish()
    for name, base in global_weights.items():
        stack = np.stack([updates[s][name].astype(np.float64) for s in sites])
        expected = reduce(stack)
        if base.dtype.kind == "i":
            expected = np.rint(expected)
        assert new[name].dtype == base.dtype and new[name].shape == base.shape
        np.testing.assert_allclose(new[name], expected.astype(base.dtype), rtol=1e-6, atol=1e-6)


def test_rejected_and_dropped_sites_are_left_out(update_file):
    agg = CoordinateMedian()
    agg.begin_round(ZERO, 0, ["a", "b", "c", "d"])
    agg.add("a", update_file("a", {"w": np.array([1, 1, 1], np.float32)}), 1)
    agg.add("b", update_file("b", {"w": np.array([3, 3, 3], np.float32)}), 1)
    with pytest.raises(ValueError, match="non-finite"):
        agg.add("c", update_file("c", {"w": np.array([np.inf, 0, 0], np.float32)}), 1)
    np.testing.assert_array_equal(agg.finish()["w"], [2, 2, 2])
    assert agg.last_round.missing == ["d"] and list(agg.last_round.rejected) == ["c"]


@pytest.mark.parametrize("kwargs, problem", [
    ({"trim": 0.5}, r"trim must be in \[0, 0.5\)"),
    ({"trim": -0.1}, "trim"),
    ({"block_bytes": 0}, "block_bytes"),
])
def test_bad_parameters(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        TrimmedMean(**kwargs)

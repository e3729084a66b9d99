"""The block-parallel sum behind the mean-based aggregators: same bits on any number of
threads, for any arrival order, whether updates are handed over or kept by the caller."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from flare_provider.aggregation import kernel, make_aggregator, mean
from flare_provider.aggregation.validation import UpdateRejected
from flare_provider.wire.tensors import TensorFile


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of 7 elements (tensors span many, the last one partial), shared out among
    threads however small the model; ``set_threads(n)`` picks the number of threads."""
    monkeypatch.setattr(mean, "BLOCK", 7)
    monkeypatch.setattr(kernel, "BLOCK", 7)
    monkeypatch.setattr(kernel, "_PARALLEL_ELEMENTS", 0)

    def set_threads(count: int) -> None:
        monkeypatch.setattr(kernel, "threads", lambda: count)

    return set_threads


def _round(algorithm, global_weights, files, samples, order, *, move, tmp_path):
    agg = make_aggregator(algorithm, spill_dir=tmp_path / "spill")
    agg.begin_round(global_weights, 1, sorted(files))
    for site in order:
        path = files[site]
        if move:  # hand over a link, as the engine hands over its downloads
            path = tmp_path / f"handed-{site}.safetensors"
            os.link(files[site], path)
        agg.add(site, path, samples[site], kind="diff" if site == "c" else "weights", move=move)
        if move:
            path.unlink(missing_ok=True)  # the engine drops what it handed over
    new = agg.finish()
    return b"".join(new[k].tobytes() for k in sorted(new)), new


@pytest.mark.parametrize("algorithm", ["fedavg", "fedadam"])
def test_same_bits_on_any_number_of_threads_in_any_order(algorithm, tiny_blocks, update_file, tmp_path):
    rng = np.random.default_rng(3)
    global_weights = {
        "w": rng.standard_normal((13, 9)).astype(np.float32),
        "h": rng.standard_normal(50).astype(np.float16),
        "steps": np.array(40, np.int64),
    }
    files = {
        s: update_file(s, {k: np.asarray((v + rng.normal(0, 0.5, v.shape)).astype(v.dtype)) for k, v in global_weights.items()})
        for s in "abcd"
    }
    samples = {"a": 3, "b": 1000, "c": 17, "d": 250}
    results = set()
    for threads in (1, 2, 3):
        tiny_blocks(threads)
        for order in itertools.permutations("abcd"):
            for move in (False, True):
                bits, new = _round(algorithm, global_weights, files, samples, order, move=move, tmp_path=tmp_path)
                results.add(bits)
    assert len(results) == 1, "the aggregate depends on threads, arrival order or handing over"
    if algorithm == "fedavg":
        from safetensors.numpy import load_file

        total = sum(samples.values())
        expected = sum(
            samples[s] * (load_file(files[s])["w"].astype(np.float64) + (global_weights["w"] if s == "c" else 0))
            for s in "abcd"
        ) / total
        np.testing.assert_allclose(new["w"], expected, rtol=1e-6)


def test_handed_over_updates_wait_as_links_and_leave_nothing_behind(tiny_blocks, update_file, tmp_path):
    tiny_blocks(2)
    agg = make_aggregator("fedavg", spill_dir=tmp_path / "spill")
    agg.begin_round({"w": np.zeros(20, np.float32)}, 1, ["a", "b"])
    first = update_file("a", {"w": np.full(20, 2, np.float32)})
    agg.add("a", first, 1, move=True)
    assert first.exists(), "an update in its turn stays where the caller put it"
    first.unlink()  # the engine drops its file: the kept link still holds the bytes
    agg.add("b", update_file("b", {"w": np.full(20, 4, np.float32)}), 1, move=True)
    np.testing.assert_array_equal(agg.finish()["w"], np.full(20, 3, np.float32))
    assert not list((tmp_path / "spill").rglob("*.safetensors"))


def test_a_non_finite_value_in_any_block_is_found_on_every_thread(tiny_blocks, update_file):
    tiny_blocks(2)
    values = np.arange(100, dtype=np.float32)
    values[93] = np.nan
    path = update_file("s", {"ok": np.ones(30, np.float32), "bad": values})
    with TensorFile(path) as tensors:
        assert kernel.count_nonfinite(tensors, ["ok", "bad"]) == {"ok": 0, "bad": 1}
    agg = make_aggregator("fedavg")
    agg.begin_round({"ok": np.ones(30, np.float32), "bad": np.ones(100, np.float32)}, 1, ["s"])
    with pytest.raises(UpdateRejected, match="tensor 'bad': 1 non-finite"):
        agg.add("s", path, 1)


def test_reading_outside_a_tensor_is_refused(update_file):
    path = update_file("s", {"w": np.ones(10, np.float32)})
    with TensorFile(path) as tensors:
        buffer = np.empty(64, np.uint8)
        np.testing.assert_array_equal(tensors.read_range("w", 6, 4, buffer), np.ones(4, np.float32))
        with pytest.raises(ValueError, match="outside tensor 'w'"):
            tensors.read_range("w", 8, 4, buffer)
        with pytest.raises(ValueError, match="cannot hold 10 elements"):
            tensors.read_range("w", 0, 10, np.empty(10, np.uint8))

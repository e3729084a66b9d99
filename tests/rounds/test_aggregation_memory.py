"""Aggregation memory stays O(model), not O(sites x model), whatever the arrival order.

tracemalloc sees numpy's and safetensors' allocations. The peak with 24 sites must be
what it is with 3 sites, and a small multiple of the model (float64 sums, moments, one
tensor's temporaries), far below the 24 models the sites sent.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import save_file

from flare_provider.aggregation import make_aggregator

SITES = 24
MIB = 1 << 20


@pytest.fixture(scope="module")
def many_updates(tmp_path_factory):
    """A 2 MiB float32 model and 24 sites' updates of it, on disk."""
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(5)
    global_weights = {
        "embedding": rng.standard_normal((256, 1024)).astype(np.float32),
        "dense": rng.standard_normal((512, 512)).astype(np.float32),
        "bias": rng.standard_normal(512).astype(np.float32),
    }
    files = {}
    for i in range(SITES):
        site = f"site-{i:02d}"
        files[site] = folder / f"{site}.safetensors"
        save_file({k: v + np.float32(0.01 * i) for k, v in global_weights.items()}, str(files[site]))
    return global_weights, files


def peak_bytes(algorithm, global_weights, files, sites, tmp_path, **kwargs):
    """Peak traced memory of one round where ``sites`` report in reverse order (all but one wait on disk)."""
    agg = make_aggregator(algorithm, spill_dir=tmp_path, **kwargs)
    tracemalloc.start()
    try:
        agg.begin_round(global_weights, 1, sites)
        for site in sorted(sites, reverse=True):
            agg.add(site, files[site], 100 + int(site[-2:]))
        new = agg.finish()
        return tracemalloc.get_traced_memory()[1], new
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("algorithm, model_multiple", [("fedavg", 5), ("fedadam", 9), ("median", 5)])
def test_memory_does_not_grow_with_sites(algorithm, model_multiple, many_updates, tmp_path):
    global_weights, files = many_updates
    model = sum(v.nbytes for v in global_weights.values())
    kwargs = {"block_bytes": MIB} if algorithm == "median" else {}
    few, _ = peak_bytes(algorithm, global_weights, files, sorted(files)[:3], tmp_path, **kwargs)
    many, new = peak_bytes(algorithm, global_weights, files, sorted(files), tmp_path, **kwargs)
    report = f"peak {few / MIB:.1f} MiB with 3 sites, {many / MIB:.1f} MiB with {SITES}, model {model / MIB:.1f} MiB"
    assert many < few * 1.2 + MIB, report
    assert many < model_multiple * model, report
    assert new["dense"].dtype == np.float32 and np.isfinite(new["dense"]).all()

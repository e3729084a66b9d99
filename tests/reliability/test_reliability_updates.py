"""Bad updates reaching the server, from real hostile peers.

The agent checks what its own trainer returns (see tests/agent/test_runtime_tasks.py), so
to reach the server's validation hostile peers take the spare sites' places with those
sites' real certificates (mutual TLS), accept the round's task and serve a crafted result
through the real chunked protocol, each a different one. One round with all of them and
the two real sites must reject every crafted update with a clear log line, finish with the
real sites, and give bit for bit the model those two give alone.
"""

from __future__ import annotations

import logging
import pickle
import re
import uuid
from contextlib import ExitStack
from types import SimpleNamespace

import numpy as np
import pytest
from reliability_support import LIVE_SITES, SPARE_SITES, HostileSite, serve_as_site

from flare_provider.client import load_caller_kit
from flare_provider.federation.records import RunSpec
from flare_provider.federation.scatter_gather import ScatterGatherRun
from flare_provider.snapshots import SnapshotStore
from flare_provider.wire.tensors import dump_bytes


def poisoned(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Far from any honest update: a trace of it in the model could not go unseen."""
    return {name: (value + 1000).astype(value.dtype) for name, value in weights.items()}


def with_nan(weights):
    update = poisoned(weights)
    update["0.bias"][0] = np.nan
    return dump_bytes(update)


# case -> (the hostile result made from the global weights, the problem the server must name)
BAD_UPDATES = {
    "nan": (with_nan, r"tensor '0\.bias': 1 non-finite value\(s\) \(NaN or Inf\)"),
    "wrong_shape": (lambda w: dump_bytes({**poisoned(w), "0.bias": np.ones(31, np.float32)}),
                    r"tensor '0\.bias': shape \[31\], expected \[32\]"),
    "wrong_dtype": (lambda w: dump_bytes({**poisoned(w), "0.bias": w["0.bias"].astype(np.float64)}),
                    r"tensor '0\.bias': dtype float64, expected float32"),
    "extra_tensor": (lambda w: dump_bytes({**poisoned(w), "backdoor": np.ones(4, np.float32)}),
                     r"unexpected tensors 'backdoor'"),
    "missing_tensor": (lambda w: dump_bytes({k: v for k, v in poisoned(w).items() if k != "2.bias"}),
                       r"missing tensors '2\.bias'"),
    "oversized": (lambda w: dump_bytes(poisoned(w), metadata={"padding": "x" * (2 << 20)}),
                  r"file is \d+ bytes, more than the \d+ an update of this model may take"),
    "pickle": (lambda w: pickle.dumps(poisoned(w)), r"not valid safetensors"),
}
HOSTILE = dict(zip(BAD_UPDATES, SPARE_SITES, strict=True))  # case -> the site that plays it

ROUND = dict(federation="hostile", app_name="digits", num_rounds=1, min_clients=2,
             wait_time_after_min_received=60.0, train_timeout=300.0, train_config={"epochs": 1})


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def one_round(fed, sites, snapshots: str, initial_model: str, logger: logging.Logger | None = None):
    """Run one round from ``initial_model``; returns (its progress, the committed snapshot, the store)."""
    spec = RunSpec(run_id=uuid.uuid4().hex, sites=tuple(sites), **ROUND)
    store = SnapshotStore(snapshots)
    kit = load_caller_kit(fed.server_kit)
    with ScatterGatherRun(spec, kit, store, initial_model=initial_model, logger=logger) as run:
        progress = run.run_rounds(run.restore())
    return progress, store.latest(spec.federation, spec.run_id), store


@pytest.fixture(scope="module")
def reference(fed, digits_initial, tmp_path_factory):
    """One round of the two real sites alone: what the hostile sites must not change."""
    snapshots = tmp_path_factory.mktemp("reference").as_uri()
    progress, _, _ = one_round(fed, LIVE_SITES, snapshots, digits_initial)
    return SimpleNamespace(weights=progress.weights, round=progress.history[-1])


@pytest.fixture(scope="module")
def hostile_round(fed, digits_initial, reference, tmp_path_factory):
    """The same round from the same model, with a hostile peer for every bad update."""
    folder = tmp_path_factory.mktemp("hostile")
    recorder = Recorder()
    logger = logging.getLogger("reliability.hostile_round")
    logger.addHandler(recorder)
    peers = {case: HostileSite(site, BAD_UPDATES[case][0], folder) for case, site in HOSTILE.items()}
    try:
        with ExitStack() as stack:
            for case, peer in peers.items():
                stack.enter_context(serve_as_site(fed, HOSTILE[case], peer))
            progress, snapshot, store = one_round(
                fed, (*LIVE_SITES, *HOSTILE.values()), folder.as_uri() + "/snapshots", digits_initial, logger
            )
    finally:
        logger.removeHandler(recorder)
    return SimpleNamespace(peers=peers, record=progress.history[-1], weights=progress.weights,
                           committed=store.load_weights(snapshot), log=recorder.messages)


@pytest.mark.parametrize("case", list(BAD_UPDATES))
def test_bad_update_is_rejected_with_a_clear_reason(case, hostile_round):
    site, problem = HOSTILE[case], BAD_UPDATES[case][1]
    assert "FetchResult" in hostile_round.peers[case].calls, "the crafted result never reached the server"
    record = hostile_round.record
    assert re.search(f"^update rejected: .*{problem}", record.dropped[site]), record.dropped
    assert record.sites[site].num_samples == 0
    logged = [m for m in hostile_round.log if f"Round 1: update from {site} rejected" in m]
    assert len(logged) == 1 and re.search(problem, logged[0]), hostile_round.log


def test_round_finishes_with_the_real_sites_and_nothing_of_the_bad_updates(hostile_round, reference):
    record = hostile_round.record
    assert record.accepted == list(LIVE_SITES)
    assert sorted(record.dropped) == sorted(HOSTILE.values())
    # Bit for bit the real sites' model, in memory and as committed; their samples and metrics only.
    for name, expected in reference.weights.items():
        assert np.array_equal(hostile_round.weights[name], expected), name
        assert np.array_equal(hostile_round.committed[name], expected), name
    assert record.num_samples == reference.round.num_samples
    assert record.metrics == reference.round.metrics

"""Privacy filters at real sites: real agents, the digits app, real PyTorch training.

What the server fetches is what the site's filters let out: an excluded variable's trained
values are not in the bytes fetched nor in the committed model; a request to drop or
loosen a site's filter is refused (recorded in the result and the audit log) and the
filter still applies; a stricter request is honoured; the round record keeps each site's
record. Central DP runs over the same sites and records the epsilon each round spends.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch
from prv_accountant import GaussianMechanism, PRVAccountant
from scipy import stats

from flare_provider.client import load_caller_kit
from flare_provider.federation.records import RunSpec
from flare_provider.federation.scatter_gather import ScatterGatherRun
from flare_provider.privacy.central import EPS_ERROR
from flare_provider.snapshots import SnapshotStore
from flare_provider.wire.tensors import RESULT_PRIVACY_KEY, describe_file, load_file
from site_agent.trainer import TaskContext

TRAIN_TIMEOUT = 180.0
MODEL = ("0.weight", "0.bias", "2.weight", "2.bias")


def train_at(fed, site: str, initial, tmp_path, config: dict | None = None, round_number: int = 1):
    """Submit a train task to ``site``, wait for it, fetch the result; (state, file)."""
    task_id = f"privacy-{uuid.uuid4().hex[:8]}-{site}"
    with fed.client(site) as client:
        client.submit_task(task_id, "digits", initial, round_number, config=config or {})
        states = list(client.watch_task(task_id, timeout=TRAIN_TIMEOUT))
        assert states and states[-1].terminal, f"{task_id} did not finish in {TRAIN_TIMEOUT} s"
        if states[-1].status != "succeeded":
            return states[-1], None
        path = tmp_path / f"{task_id}.safetensors"
        client.fetch_result(task_id, path)
        client.acknowledge(task_id)
    return states[-1], path


def record_of(path) -> dict:
    return json.loads(describe_file(path)[1][RESULT_PRIVACY_KEY])


def fetch_entry(audit_log, site: str, task_id: str) -> dict:
    (entry,) = [e for e in audit_log(site) if e["method"] == "FetchResult" and e.get("task_id") == task_id]
    return entry


def test_an_excluded_variable_never_leaves_the_site(fed, initial_model, digits_app, tmp_path, audit_log):
    state, path = train_at(fed, "site-1", initial_model, tmp_path)
    sent, fetched, raw = load_file(initial_model), load_file(path), path.read_bytes()
    # What the site trained, reproduced here with the same trainer, data and seed (CPU, deterministic).
    from site_agent.trainers.pytorch import ClassifierTrainer

    torch.set_num_threads(1)
    ctx = TaskContext(task_id=state.task_id, site="site-1", round=1, kind="train", config={},
                      data_dir=fed.data_dir("site-1"), work_dir=tmp_path, app_dir=fed.kits["site-1"], device="cpu")
    local = ClassifierTrainer(**digits_app["trainer"]["args"]).train(
        {k: torch.from_numpy(v) for k, v in sent.items()}, ctx).weights
    local = {k: v.numpy() for k, v in local.items()}
    for name in ("0.weight", "0.bias", "2.weight"):  # not excluded: the site's trained values, exactly
        np.testing.assert_array_equal(fetched[name], local[name])
    assert not np.array_equal(local["2.bias"], sent["2.bias"]), "training did change the excluded tensor"
    np.testing.assert_array_equal(fetched["2.bias"], sent["2.bias"])  # what the site received, nothing else
    assert local["2.bias"].tobytes() not in raw, "the trained values of 2.bias are not in the bytes fetched"
    record = record_of(path)
    assert record == {"applied": [{"filter": "exclude_vars", "names": ["2.bias"], "patterns": [], "source": "site",
                                   "excluded": ["2.bias"]}], "refused": []}
    assert fetch_entry(audit_log, "site-1", state.task_id)["privacy"] == record


def noise_of(sent, fetched) -> np.ndarray:
    """The change the site sent for every float value that left (2.bias stays home)."""
    return np.concatenate([(fetched[n].astype(np.float64) - sent[n]).reshape(-1) for n in MODEL if n != "2.bias"])


def within_chi2(noise: np.ndarray, sigma: float) -> bool:
    """Two-sided chi-square test of the variance at 1e-4: (n - 1) s^2 / sigma^2 ~ chi2(n - 1)."""
    n = noise.size
    statistic = (n - 1) * noise.var(ddof=1) / sigma**2
    return stats.chi2.ppf(5e-5, n - 1) < statistic < stats.chi2.ppf(1 - 5e-5, n - 1)


def test_a_request_to_drop_or_loosen_a_site_filter_is_refused(fed, initial_model, tmp_path, audit_log):
    looser = {"privacy": {"exclude_vars": None, "gaussian": {"noise_multiplier": 0.1, "clip": 10.0}, "seed": 1}}
    state, path = train_at(fed, "site-2", initial_model, tmp_path, looser)
    assert state.status == "succeeded", state.error
    sent, fetched = load_file(initial_model), load_file(path)
    np.testing.assert_array_equal(fetched["2.bias"], sent["2.bias"])  # still excluded
    noise = noise_of(sent, fetched)
    # the site's noise (std 0.1; the clipped update, norm <= 0.05, is negligible beside it), not the request's
    assert within_chi2(noise, 0.1) and not within_chi2(noise, 0.1 * 0.1 / 2.0)
    assert abs(noise.mean()) < 4 * 0.1 / np.sqrt(noise.size)
    record = record_of(path)
    gaussian = [a for a in record["applied"] if a["filter"] == "gaussian"]
    assert gaussian == [{"filter": "gaussian", "clip": 0.05, "noise_multiplier": 2.0, "source": "site"}]
    assert [a["filter"] for a in record["applied"]] == ["exclude_vars", "gaussian"]
    refused = "\n".join(record["refused"])
    assert len(record["refused"]) == 4
    for text in ("dropping the site's 'exclude_vars' filter is not allowed",
                 "gaussian.noise_multiplier = 0.1 is looser", "gaussian.clip = 10.0 is looser", "seed is the site's alone"):
        assert text in refused
    assert fetch_entry(audit_log, "site-2", state.task_id)["privacy"]["refused"] == record["refused"]


def test_a_stricter_request_is_honoured(fed, initial_model, tmp_path):
    state, path = train_at(fed, "site-2", initial_model, tmp_path, {"privacy": {"gaussian": {"noise_multiplier": 4.0}}})
    assert state.status == "succeeded", state.error
    noise = noise_of(load_file(initial_model), load_file(path))
    assert within_chi2(noise, 4.0 * 0.05) and not within_chi2(noise, 0.1)
    gaussian = [a for a in record_of(path)["applied"] if a["filter"] == "gaussian"]
    assert gaussian == [{"filter": "gaussian", "clip": 0.05, "noise_multiplier": 4.0, "source": "site+task"}]


def test_a_malformed_request_fails_the_task_before_it_trains(fed, initial_model, tmp_path):
    state, path = train_at(fed, "site-1", initial_model, tmp_path, {"privacy": {"blur": {"radius": 3}}})
    assert (state.status, path) == ("failed", None)
    assert "task config: privacy: unknown filter(s) ['blur']" in state.error
    assert not state.metrics, "no training happened"


def run(fed, tmp_path, initial_model, name: str, rounds: int, **spec_args):
    spec = RunSpec(federation="privacy", run_id=name, app_name="digits", sites=("site-1", "site-2"),
                   num_rounds=rounds, min_clients=2, **spec_args)
    store = SnapshotStore((tmp_path / "snapshots").as_uri())
    with ScatterGatherRun(spec, load_caller_kit(fed.server_kit), store, initial_model=str(initial_model)) as engine:
        progress = engine.run()
    return store, progress


def test_the_committed_model_holds_no_excluded_values(fed, initial_model, tmp_path):
    store, progress = run(fed, tmp_path, initial_model, "exclude", 1)
    sent = load_file(initial_model)
    committed = store.load_weights(store.get_round("privacy", "exclude", 1))
    np.testing.assert_array_equal(committed["2.bias"], sent["2.bias"])  # both sites kept it home
    assert not np.array_equal(committed["0.weight"], sent["0.weight"])
    (record,) = progress.history
    assert record.sites["site-1"].privacy["applied"][0]["excluded"] == ["2.bias"]
    assert [a["filter"] for a in record.sites["site-2"].privacy["applied"]] == ["exclude_vars", "gaussian"]
    assert record.privacy == {}, "no central DP in this run"


def test_central_dp_records_the_epsilon_each_round_spends(fed, initial_model, tmp_path):
    z, delta = 1.1, 1e-5
    store, progress = run(fed, tmp_path, initial_model, "central", 2,
                          central_dp={"clip": 0.5, "noise_multiplier": z, "delta": delta, "seed": 3})
    history = [r.privacy for r in progress.history]
    assert [h["rounds"] for h in history] == [1, 2] and [h["sites"] for h in history] == [2, 2]
    for number, spent in enumerate(history, start=1):
        library = PRVAccountant(prvs=[GaussianMechanism(z)], max_self_compositions=[number],
                                eps_error=EPS_ERROR, delta_error=delta * 1e-3).compute_epsilon(delta, [number])
        assert spent["epsilon"] == pytest.approx(library[2], rel=1e-9)
        assert spent["noise_std"] == pytest.approx(z * 0.5 / 2) and spent["delta"] == delta
    assert history[0]["epsilon"] < history[1]["epsilon"]
    # the committed history (what the Federation page and XCom read) carries the same records
    committed = store.get_round("privacy", "central", 2).state["history"]
    assert [r["privacy"]["epsilon"] for r in committed] == [h["epsilon"] for h in history]
    assert committed[1]["sites"]["site-2"]["privacy"]["applied"][1]["filter"] == "gaussian"

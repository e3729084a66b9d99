"""The rules a federated run follows, checked without sites: gather, task ids, arguments, connections."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from flare_provider.federation.gather import GatherRule
from flare_provider.federation.records import RunSpec, weighted_metrics
from flare_provider.hooks.flare import FlareConnectionError, FlareHook, normalize_pem
from flare_provider.provisioning import load_project, provision


def spec(**overrides) -> RunSpec:
    base = dict(federation="fed", run_id="manual__2026-11-21T10:00:00+00:00", app_name="digits",
                sites=("a", "b", "c"), num_rounds=3, min_clients=2)
    return RunSpec(**{**base, **overrides})


class TestGatherRule:
    policy = GatherRule(min_clients=2, wait_time_after_min_received=5.0, deadline=100.0)

    def test_waits_while_sites_train(self):
        assert self.policy.done({"a": "running", "b": "queued", "c": "running"}, None, 10.0) is None

    def test_stops_when_all_finished(self):
        assert self.policy.done({"a": "succeeded", "b": "failed", "c": "succeeded"}, 9.0, 10.0) == "all sites finished"

    def test_grace_period_after_min_clients(self):
        statuses = {"a": "succeeded", "b": "succeeded", "c": "running"}
        assert self.policy.done(statuses, 10.0, 14.9) is None
        assert "grace period passed" in self.policy.done(statuses, 10.0, 15.0)

    def test_deadline(self):
        assert self.policy.done({"a": "running", "b": "running", "c": "running"}, None, 100.0) == "train_timeout reached"

    def test_gives_up_when_too_few_can_finish(self):
        assert self.policy.done({"a": "failed", "b": "aborted", "c": "running"}, None, 10.0) == "too few sites can still finish"


def test_task_ids_are_stable_and_distinct():
    s = spec()
    assert s.task_id(2, "a") == spec().task_id(2, "a")
    ids = {s.task_id(r, site) for r in (1, 2) for site in ("a", "b")}
    assert len(ids) == 4
    assert spec(run_id="other").task_id(2, "a") != s.task_id(2, "a")
    assert s.task_id(1, "admin@x.y") .endswith("admin_x.y")
    assert s.task_id(3, "a", "evaluate").endswith("-evaluate")


def test_config_hash_ignores_run_id_only():
    assert spec().config_hash == spec(run_id="x").config_hash
    assert spec().config_hash != spec(num_rounds=4).config_hash


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_rounds": 0}, "num_rounds must be at least 1"),
        ({"min_clients": 4}, "min_clients must be between 1 and the number of sites"),
        ({"sites": ()}, "no sites"),
        ({"sites": ("a", "a")}, "named twice"),
        ({"train_timeout": 0}, "train_timeout > 0"),
    ],
)
def test_bad_run_specs(overrides, message):
    with pytest.raises(ValueError, match=message):
        spec(**overrides)


def test_trainer_config_merges_round_overrides():
    s = spec(train_config={"lr": 0.1, "epochs": 1}, round_configs={2: {"lr": 0.05}})
    assert s.trainer_config(2, {"fedprox_mu": 0.01}) == {"lr": 0.05, "epochs": 1, "fedprox_mu": 0.01, "round": 2, "num_rounds": 3}
    assert s.trainer_config(1, {})["lr"] == 0.1


def test_weighted_metrics():
    per_site = {"a": {"num_samples": 100, "metrics": {"acc": 0.9}}, "b": {"num_samples": 300, "metrics": {"acc": 0.5, "loss": 1.0}}}
    assert weighted_metrics(per_site) == pytest.approx({"acc": 0.6, "loss": 1.0})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_rounds": 0}, "num_rounds must be a positive integer"),
        ({"min_clients": -1}, "min_clients must be a positive integer"),
        ({"aggregator": "fedsum"}, "unknown aggregator 'fedsum'"),
        ({"train_timeout": "soon"}, "train_timeout must be a non-negative number"),
        ({"sites": ["a", "a"]}, "sites must be distinct"),
        ({"sites": ["a"], "min_clients": 2}, "more than the 1 sites"),
        ({"snapshot_uri": "gs://bucket"}, "snapshot_uri must be s3://"),
    ],
)
def test_operator_arguments_fail_at_parse_time(kwargs, message):
    from flare_provider.operators import ScatterGatherOperator

    with pytest.raises(ValueError, match=message):
        ScatterGatherOperator(task_id="train", app_name="digits", **kwargs)


def test_templated_arguments_wait_for_rendering():
    from flare_provider.operators import ScatterGatherOperator

    op = ScatterGatherOperator(task_id="train", app_name="digits", num_rounds="{{ params.rounds }}", aggregator="{{ params.agg }}")
    assert op.num_rounds == "{{ params.rounds }}"


def test_pem_survives_a_one_line_form_field():
    pem = "-----BEGIN PRIVATE KEY-----\n" + "A" * 64 + "\n" + "B" * 20 + "\n-----END PRIVATE KEY-----\n"
    flattened = pem.replace("\n", " ")
    assert normalize_pem(flattened) == pem.encode()
    assert normalize_pem("no pem here") == b""


@pytest.fixture(scope="module")
def imported_connection(tmp_path_factory, sample_project_file):
    """The server kit's connections.json, as `airflow connections import` stores it."""
    result = provision(load_project(sample_project_file), tmp_path_factory.mktemp("ws"))
    doc = json.loads((result.kits["airflow-server"] / "startup" / "connections.json").read_text())
    (conn_id, fields), = doc.items()
    return SimpleNamespace(conn_id=conn_id, login=fields["login"], password=fields["password"], extra=fields["extra"],
                           extra_dejson=json.loads(fields["extra"]))


def test_connection_from_the_server_kit_gives_the_identity(imported_connection):
    kit = FlareHook.kit_from_connection(imported_connection)
    assert kit.project == "hospital_federation" and kit.name == "airflow-server" and kit.kind == "server"
    assert sorted(kit.sites) == ["hospital-a", "hospital-b", "hospital-c"]
    assert kit.endpoint("hospital-c").address == "fl.hospital-c.example:9102"
    assert kit.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")


def test_connection_fields_from_the_ui_form_are_read(imported_connection):
    extra = {f"extra__flare__{k}": v for k, v in imported_connection.extra_dejson.items()}
    conn = SimpleNamespace(**{**vars(imported_connection), "extra_dejson": extra})
    conn.password = conn.password.replace("\n", " ")  # a one-line password field
    assert FlareHook.kit_from_connection(conn).key_pem == FlareHook.kit_from_connection(imported_connection).key_pem


def test_incomplete_connection_names_what_is_missing(imported_connection):
    conn = SimpleNamespace(**{**vars(imported_connection), "password": "", "extra_dejson": {"project": "p"}})
    with pytest.raises(FlareConnectionError, match="lacks cert_pem, root_ca_pem, sites, password"):
        FlareHook.kit_from_connection(conn)

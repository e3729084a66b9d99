"""Bad inputs that earlier suites do not try (docs/reliability.md lists the ones they do).

- Expired certificates, issued from the project's root key in the workspace's ``state/``:
  a caller's is refused by a real agent at the handshake, a site's by the server's client.
- Bad ``ScatterGatherOperator`` arguments: the DAG file fails to import, with every problem
  in Airflow's DagBag import errors, and the DAG files beside it still load.
- Bad aggregator arguments, which only the aggregator can check: the task fails at once,
  without retries, before any site is contacted (the agents' audit logs show no call).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from reliability_support import (
    LIVE_SITES,
    SPARE_SITES,
    HostileSite,
    dag_file,
    kit_identity,
    reissue,
    root_identity,
    serve_as_site,
    task_instance,
    validity,
)

from flare_provider.client import AgentClient, AgentError, load_caller_kit
from flare_provider.wire.tensors import dump_bytes, load_file
from site_agent.service.audit import AUDIT_FILE, read_audit_log

EXPIRED = (-30, -1)  # valid from 30 days ago until yesterday, in days from now
CURRENT = (-1, 1)


def audit_entries(fed, site: str) -> list[dict]:
    return read_audit_log(fed.kits[site] / "work" / AUDIT_FILE)


def test_expired_caller_certificate_is_refused_at_the_handshake(fed):
    site = LIVE_SITES[0]
    kit = load_caller_kit(fed.server_kit)
    server, root = kit_identity(fed, fed.server), root_identity(fed)

    def status_as(identity):
        address = kit.endpoint(site).address
        with AgentClient(site, address, identity.cert_pem, identity.key_pem, kit.root_ca_pem, timeout=10) as client:
            return client.status()

    before = len(audit_entries(fed, site))
    with pytest.raises(AgentError) as caught:
        status_as(reissue(server, root, *validity(*EXPIRED)))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and f"site {site!r}" in str(caught.value)
    assert len(audit_entries(fed, site)) == before, "a refused handshake reaches no handler"
    # The same certificate valid today is let in: the dates were what was refused.
    assert status_as(reissue(server, root, *validity(*CURRENT))).caller["name"] == fed.server


def test_expired_site_certificate_is_refused_by_the_server(fed, tmp_path):
    site = SPARE_SITES[0]
    identity, root = kit_identity(fed, site), root_identity(fed)
    kit = load_caller_kit(fed.server_kit)
    for dates, accepted in ((EXPIRED, False), (CURRENT, True)):
        stand_in = HostileSite(site, lambda weights: b"", tmp_path)
        with serve_as_site(fed, site, stand_in, reissue(identity, root, *validity(*dates))):
            with kit.client(site, timeout=10) as client:
                if accepted:
                    assert client.status().site == site
                else:
                    with pytest.raises(AgentError) as caught:
                        client.status()
                    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
                    assert "certificate has expired" in caught.value.details
        assert stand_in.calls == (["GetStatus"] if accepted else []), dates


def test_an_agent_that_speaks_only_sha256_gets_weights_and_serves_results_checked_with_it(fed, tmp_path):
    """An agent of an earlier version lists no fast checksum and ignores the one a client
    offers: a large upload and its result go with SHA-256, as they did before XXH3."""
    site = SPARE_SITES[0]
    weights = {"w": np.random.default_rng(3).standard_normal(2 << 20).astype(np.float32)}  # 8 MiB
    earlier_agent = HostileSite(site, lambda received: dump_bytes(received), tmp_path)
    with serve_as_site(fed, site, earlier_agent), load_caller_kit(fed.server_kit).client(site, timeout=10) as client:
        _, created = client.submit_task("sha-only", "any", dump_bytes(weights), 1)
        assert created and client.last_transfer.checksum == "sha256"
        client.fetch_result("sha-only", tmp_path / "result.safetensors")
        assert client.last_transfer.checksum == "sha256"
    assert np.array_equal(load_file(tmp_path / "result.safetensors")["w"], weights["w"])
    assert earlier_agent.calls[:2] == ["GetStatus", "SubmitTask"]


def test_bad_operator_arguments_fail_the_dag_file_import(tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / "bad_arguments.py").write_text(dag_file("bad_arguments", {"train": dict(
        app_name="digits", num_rounds=0, aggregator="fedsum", snapshot_uri="gs://bucket/runs",
        sites=["site-1", "site-2"], min_clients=3, deferrable=True, snapshot_every=2,
        connect_grace=-1,
    )}))
    (folder / "good_arguments.py").write_text(dag_file("good_arguments", {"train": dict(app_name="digits")}))

    bag = DagBag(dag_folder=folder)
    assert bag.dag_ids == ["good_arguments"]
    ((path, error),) = bag.import_errors.items()
    assert path.endswith("bad_arguments.py")
    for problem in (
        "ValueError: ScatterGatherOperator 'train': num_rounds must be a positive integer, got 0",
        "unknown aggregator 'fedsum'; choose one of fedavg, fedprox",
        "min_clients (3) is more than the 2 sites given",
        "snapshot_uri must be s3://bucket/prefix or file:///path, got 'gs://bucket/runs'",
        "snapshot_every must be 1 with deferrable=True (every round is committed), got 2",
        "connect_grace must be a number of seconds >= 0, got -1",
    ):
        assert problem in error, error


# task id -> (aggregator, its arguments, what the failure must say)
BAD_AGGREGATORS = {
    "unknown_argument": ("fedadam", {"learning_rate": 0.1},
                         "aggregator 'fedadam': got an unexpected keyword argument 'learning_rate'; "
                         "it takes: beta2, server_lr, beta1"),
    "bad_value": ("fedadam", {"beta1": 1.5}, "aggregator 'fedadam': beta1 must be in [0, 1), got 1.5"),
    "missing_class": ("our_lab.aggregators.Krum", {},
                      "aggregator 'our_lab.aggregators.Krum': cannot import 'our_lab.aggregators'"),
}


def test_bad_aggregator_arguments_fail_the_task_before_any_site_is_contacted(fed, run_dag, task_log, tmp_path):
    tasks = {task_id: dict(app_name="digits", flare_conn_id=fed.conn_id, sites=list(LIVE_SITES), aggregator=name,
                           aggregator_args=args, snapshot_uri=(tmp_path / "snapshots").as_uri())
             for task_id, (name, args, _) in BAD_AGGREGATORS.items()}
    before = {site: len(audit_entries(fed, site)) for site in LIVE_SITES}
    dag_run = run_dag(dag_file("bad_aggregators", tasks, retries=2), "bad_aggregators")
    log = task_log()
    assert dag_run.state == "failed"
    for task_id, (_, _, message) in BAD_AGGREGATORS.items():
        ti = task_instance(dag_run, task_id)
        assert (ti.state, ti.try_number) == ("failed", 1), f"{task_id}: a retry cannot fix its arguments"
        assert f"AirflowFailException: {message}" in log, task_id
    assert {site: len(audit_entries(fed, site)) for site in LIVE_SITES} == before, "a site was contacted"
    assert not (tmp_path / "snapshots").exists()

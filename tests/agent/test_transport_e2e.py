"""End to end through gRPC: a real agent process trains the digits app with real PyTorch.

Deploy a signed bundle, submit (twice: one training), watch progress, fetch and
acknowledge the result; a result outlives a SIGKILLed agent; abort kills the worker;
``flare status`` shows a live site and an unreachable one.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import numpy as np
import pytest

from flare_provider import __version__
from flare_provider.cli import main as flare_main
from flare_provider.client import RECONNECT_BACKOFF_MS, AgentError, AsyncAgentClient, load_caller_kit
from flare_provider.wire.bundles import read_bundle_manifest
from flare_provider.wire.tensors import (
    RESULT_KIND_KEY,
    describe_file,
    dump_bytes,
    load_file,
)
from site_agent.datasets.digits import write_site_partitions

TRAIN_TIMEOUT = 180.0  # seconds; a few epochs of a small MLP take a few seconds on one core
MODEL_TENSORS = {"0.weight": (32, 64), "0.bias": (32,), "2.weight": (10, 32), "2.bias": (10,)}
EMPTY_MODEL = dump_bytes({})  # no global weights yet: the trainer starts from its seeded model


@pytest.fixture(scope="module")
def agent(federation, make_agent):
    write_site_partitions([federation.kits[site] / "data" for site in federation.sites], seed=0)
    return make_agent("site-1").start()


@pytest.fixture(scope="module")
def client(federation, agent):
    with federation.client("site-1") as client:
        yield client


@pytest.fixture(scope="module")
def digits(client, federation):
    """The digits app, deployed once for the module."""
    app, _ = client.deploy_app(federation.bundle("digits"))
    return app


def finish(client, task_id: str):
    """Watch a task to its end; returns every state seen."""
    states = list(client.watch_task(task_id, timeout=TRAIN_TIMEOUT))
    assert states and states[-1].terminal, f"task {task_id} did not finish in {TRAIN_TIMEOUT} s: {states[-1:]}"
    return states


def test_deploy_a_signed_bundle(client, federation):
    bundle = federation.bundle("digits")
    version = read_bundle_manifest(bundle).version
    app, newly = client.deploy_app(bundle)
    again, newly_again = client.deploy_app(federation.bundle("digits"))  # signed anew, same content
    assert (app.name, app.version, app.has_custom_code) == ("digits", version, False)
    assert (again.version, again.deployed_at) == (app.version, app.deployed_at)
    assert newly_again is False
    assert [(a.name, a.version) for a in client.status().apps] == [("digits", version)]


def test_train_fetch_and_acknowledge(client, digits, tmp_path):
    task_id = "run-1:round-0:site-1"
    first, created = client.submit_task(task_id, "digits", EMPTY_MODEL, 0, config={"epochs": 3})
    again, created_again = client.submit_task(task_id, "digits", EMPTY_MODEL, 0, config={"epochs": 3})
    assert (created, created_again) == (True, False)
    assert again.created_at == first.created_at and first.app_version == digits.version

    states = finish(client, task_id)
    seqs = [s.seq for s in states]
    assert seqs == sorted(set(seqs)), "watch sends each change once, in order"
    done = states[-1]
    assert done.status == "succeeded", done.error
    assert done.progress == 1.0 and done.result_available and done.num_samples > 0
    assert {"train_loss", "train_accuracy", "val_accuracy"} <= set(done.metrics)

    late, created_late = client.submit_task(task_id, "digits", EMPTY_MODEL, 0)
    assert not created_late and (late.status, late.started_at) == ("succeeded", done.started_at)
    assert client.status().task_counts == {"succeeded": 1}, "the repeated submits trained nothing"

    update = tmp_path / "update.safetensors"
    fetched = client.fetch_result(task_id, update)
    assert (fetched.task_id, fetched.num_samples, fetched.metrics) == (task_id, done.num_samples, done.metrics)
    specs, metadata = describe_file(update)
    assert {name: spec.shape for name, spec in specs.items()} == MODEL_TENSORS
    assert metadata[RESULT_KIND_KEY] == "weights"
    assert all(np.isfinite(w).all() and w.dtype == np.float32 for w in load_file(update).values())
    assert [p.name for p in tmp_path.iterdir()] == ["update.safetensors"], "no partial download left"

    client.acknowledge(task_id)
    assert client.get_task(task_id).result_available is False
    with pytest.raises(AgentError) as info:
        client.fetch_result(task_id, tmp_path / "again.safetensors")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "acknowledged" in info.value.details

    # The next round starts from the fetched weights, as the server would send them.
    second, _ = client.submit_task("run-1:round-1:site-1", "digits", update, 1, config={"epochs": 1})
    assert finish(client, second.task_id)[-1].status == "succeeded"


def answer(call, *args):
    """The call's result, or None while the site is unreachable."""
    try:
        return call(*args)
    except AgentError as exc:
        if exc.code != grpc.StatusCode.UNAVAILABLE:
            raise
        return None


def test_result_survives_a_killed_agent(client, digits, agent, tmp_path, wait_until):
    task_id = "run-2:round-0:site-1"
    client.submit_task(task_id, "digits", EMPTY_MODEL, 0, config={"epochs": 1})
    assert finish(client, task_id)[-1].status == "succeeded"

    agent.kill()  # no clean-up at all
    with pytest.raises(AgentError) as info:
        client.get_task(task_id)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    agent.start()

    # The same client reconnects on its own once the site is back (within its reconnect backoff).
    state = wait_until(lambda: answer(client.get_task, task_id), RECONNECT_BACKOFF_MS / 1000 + 10, "a reconnect")
    assert state.status == "succeeded" and state.result_available
    client.fetch_result(task_id, tmp_path / "after-restart.safetensors")
    assert set(load_file(tmp_path / "after-restart.safetensors")) == set(MODEL_TENSORS)
    client.acknowledge(task_id)


def test_abort_kills_the_worker(client, federation, digits, agent, wait_until):
    task_id = "run-3:round-0:site-1"
    client.submit_task(task_id, "digits", EMPTY_MODEL, 0, config={"epochs": 100_000, "batch_size": 1})
    running = wait_until(
        lambda: (s := client.get_task(task_id)).status == "running" and s, 60, "the task to start"
    )
    pids = wait_until(lambda: agent.worker_pids(task_id), 30, "the worker process")

    async def watch_briefly():
        async with AsyncAgentClient.from_kit(federation.server_kit, "site-1") as aclient:
            assert (await aclient.status()).site == "site-1"
            assert (await aclient.get_task(task_id)).status == "running"
            return [s async for s in aclient.watch_task(task_id, timeout=1.5, after_seq=running.seq - 1)]

    seen = asyncio.run(watch_briefly())  # a watch that runs out of time ends quietly
    assert seen and seen[0].status == "running"

    with federation.client("site-1", caller="it@org_a") as admin:  # an org_admin of the site's org
        aborted = admin.abort(task_id)
    assert aborted.status == "aborted"
    wait_until(lambda: not agent.worker_pids(task_id), 15, f"worker processes {pids} to end")
    assert not agent.worker_pids(task_id)
    assert client.status().active_tasks == []


def test_async_client_errors_name_the_site(federation, agent):
    async def ask(caller: str, method: str):
        async with load_caller_kit(federation.kits[caller]).async_client("site-1") as aclient:
            await getattr(aclient, method)("never-submitted")

    for caller, method, code in [
        ("fl-server", "get_task", grpc.StatusCode.NOT_FOUND),
        ("fl-server", "abort", grpc.StatusCode.NOT_FOUND),
        ("viewer@org_a", "abort", grpc.StatusCode.PERMISSION_DENIED),
    ]:
        with pytest.raises(AgentError) as info:
            asyncio.run(ask(caller, method))
        assert info.value.code == code and info.value.site == "site-1"
        assert "never-submitted" in info.value.details or "may not abort" in info.value.details


@pytest.mark.parametrize("kit", ["fl-server", "viewer@org_a"])
def test_flare_status_shows_live_and_unreachable_sites(federation, digits, kit):
    result = subprocess.run(
        [sys.executable, "-m", "flare_provider.cli", "status", "--kit", str(federation.kits[kit]), "--timeout", "3"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr  # one site is down
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("site-")}
    live, down = lines["site-1"].split(), lines["site-2"]
    assert live[1:4] == [federation.address("site-1"), "up", __version__]
    assert f"digits@{digits.version[:12]}" in lines["site-1"]
    assert f"{federation.address('site-2')}  unavailable" in down and "connect" in down.lower()
    assert f"asking as {kit!r}" in result.stdout


def test_flare_status_refuses_a_kit_that_is_no_caller_kit(federation, capsys):
    assert flare_main(["status", "--kit", str(federation.kits["site-1"])]) == 2
    assert "neither startup/server.json nor startup/admin.json" in capsys.readouterr().err

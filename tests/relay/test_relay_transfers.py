"""A relay SIGKILLed in the middle of an upload and of a download: the transfer resumes through the
other relay from the last byte the other end holds, the relay comes back, nothing trains twice."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
from relay_support import RELAYS, relay_status, run_rounds, wait_attached

from flare_provider.wire.tensors import load_file, save_file

MODEL_BYTES = 96 << 20
SITE = "site-1"


def carrying_relay(fed) -> str:
    """The relay with a path open (the one the transfer goes through)."""
    deadline = time.time() + 10
    while time.time() < deadline:
        for server in RELAYS:
            if relay_status(fed, server).get("paths"):
                return server
        time.sleep(0.05)
    raise AssertionError("no relay carries a path")


def kill_when(fed, moved, threshold: int) -> str:
    """SIGKILL the carrying relay once ``moved()`` passes ``threshold`` bytes; its name."""
    deadline = time.time() + 60
    while moved() < threshold:
        assert time.time() < deadline, "the transfer did not get going"
        time.sleep(0.01)
    victim = carrying_relay(fed)
    fed.relay(victim).kill()
    return victim


def trainings(fed, task_id: str) -> int:
    return fed.agent(SITE).log_tail(5000).count(f"task {task_id} running in process")


def test_cut_upload_and_download_resume_through_the_other_relay(relayed, tmp_path):
    for server in RELAYS:
        wait_attached(relayed, server, relayed.sites)
    weights = tmp_path / "model.safetensors"
    save_file({"w": np.zeros(MODEL_BYTES // 4, np.float32)}, weights)
    task_id = f"cut-{uuid.uuid4().hex[:8]}"
    outcome: dict = {}
    with relayed.client(SITE) as client:
        upload = threading.Thread(target=lambda: outcome.update(
            submitted=client.submit_task(task_id, "slow_plus_one", weights, 1, config={"sleep_s": 0})))
        upload.start()
        victim = kill_when(relayed, lambda: client.last_transfer.transferred_bytes if client.last_transfer else 0,
                           MODEL_BYTES // 3)
        upload.join(180)
        up = client.last_transfer
        relayed.relay(victim).start().wait_ready()
        state, created = outcome["submitted"]
        assert created and up.completed and up.resumed_at, up
        assert up.repeated_bytes < MODEL_BYTES // 4, up  # a fraction of the model, not the model again
        print(f"[measured] upload of {MODEL_BYTES >> 20} MiB cut at {up.resumed_at[0] >> 20} MiB by killing relay "
              f"{victim}: {up.repeated_bytes / 2**20:.1f} MiB sent twice")

        while not state.terminal:
            for state in client.watch_task(task_id, timeout=30, after_seq=state.seq):
                pass
        assert state.status == "succeeded", state.error
        wait_attached(relayed, victim, relayed.sites)

        dest = tmp_path / "result.safetensors"
        download = threading.Thread(target=lambda: outcome.update(fetched=client.fetch_result(task_id, dest)))
        download.start()
        victim = kill_when(relayed, lambda: (client.last_transfer.transferred_bytes
                                             if client.last_transfer and client.last_transfer.method == "FetchResult"
                                             else 0), MODEL_BYTES // 3)
        download.join(180)
        down = client.last_transfer
        relayed.relay(victim).start().wait_ready()
        assert outcome["fetched"].task_id == task_id and down.completed and down.resumed_at, down
        assert down.repeated_bytes < MODEL_BYTES // 4, down
        print(f"[measured] download of {MODEL_BYTES >> 20} MiB cut at {down.resumed_at[0] >> 20} MiB by killing "
              f"relay {victim}: {down.repeated_bytes / 2**20:.1f} MiB received twice")
        client.acknowledge(task_id)
    assert np.all(load_file(dest)["w"] == 1.0)  # the whole model, trained once, came back whole
    assert trainings(relayed, task_id) == 1
    wait_attached(relayed, victim, relayed.sites)


def test_a_round_completes_when_its_relay_dies_during_the_scatter(relayed, tmp_path):
    for server in RELAYS:
        wait_attached(relayed, server, relayed.sites)
    outcome: dict = {}
    run_id = uuid.uuid4().hex
    initial = tmp_path / "initial.safetensors"
    save_file({"w": np.zeros(MODEL_BYTES // 4, np.float32)}, initial)
    worker = threading.Thread(target=lambda: outcome.update(progress=run_rounds(relayed, tmp_path, run_id=run_id)))
    worker.start()
    time.sleep(0.3)
    victim = carrying_relay(relayed)
    relayed.relay(victim).kill()
    worker.join(300)
    relayed.relay(victim).start().wait_ready()
    (record,) = outcome["progress"].history
    assert record.accepted == list(relayed.sites), record.dropped
    assert float(np.asarray(outcome["progress"].weights["w"])[0]) == 1.0
    wait_attached(relayed, victim, relayed.sites)

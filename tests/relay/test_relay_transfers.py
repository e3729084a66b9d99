"""A relay SIGKILLed in the middle of an upload and of a download: the transfer resumes from the last
byte the other end holds, through the other relay or through the same one restarted; the relay comes
back, nothing trains twice."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
from relay_support import RELAYS, outbound_federation, relay_status, run_rounds, wait_attached

from flare_provider.client import load_caller_kit
from flare_provider.federation.records import RunSpec
from flare_provider.federation.scatter_gather import ScatterGatherRun
from flare_provider.poc.processes import wait_for
from flare_provider.snapshots import SnapshotStore
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


def trainings(fed, site: str, task_id: str) -> int:
    """How many times ``site``'s agent started task ``task_id`` (its log says so each time)."""
    return fed.agent(site).log_path.read_text().count(f"task {task_id} running in process")


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
    assert trainings(relayed, SITE, task_id) == 1
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


# ---- one relay, killed and restarted ------------------------------------------------------


@pytest.fixture(scope="module")
def single_relay(tmp_path_factory):
    """Three outbound sites and one relay: while it is down, nothing reaches them any other way."""
    yield from outbound_federation(tmp_path_factory.mktemp("single_relay"), "single", num_relays=1)


def moved(clients: dict, method: str) -> dict[str, int]:
    """Payload bytes each site's ``method`` transfer has moved so far (0: not begun)."""
    return {site: (c.last_transfer.transferred_bytes if c.last_transfer and c.last_transfer.method == method else 0)
            for site, c in clients.items()}


def restart_relay_mid_transfer(fed, clients: dict, method: str, threshold: int) -> tuple[dict[str, int], float]:
    """SIGKILL the relay once every site's ``method`` transfer has moved ``threshold`` bytes, then start
    it again from the same kit on the same port. Returns what each transfer had moved at the kill, and when."""
    deadline = time.time() + 60
    while min(moved(clients, method).values()) < threshold:
        assert time.time() < deadline, f"the {method} transfers did not get going: {moved(clients, method)}"
        time.sleep(0.005)
    relay = fed.relay()
    old_pid = relay.pid
    relay.kill()
    killed_at = time.time()
    at_kill = moved(clients, method)
    assert all(c.last_transfer.method == method and not c.last_transfer.completed for c in clients.values()), \
        f"a {method} ended before the kill: {at_kill}"
    # Down: the process is gone and nothing listens on the relay's port.
    assert not psutil.pid_exists(old_pid)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", fed.relay_ports[fed.server])) != 0
    relay.start().wait_ready()
    assert relay.pid != old_pid
    return at_kill, killed_at


def test_a_round_completes_when_its_only_relay_is_killed_and_restarted_mid_upload_and_mid_download(
        single_relay, tmp_path):
    fed = single_relay
    wait_attached(fed, fed.server, fed.sites)
    initial = tmp_path / "initial.safetensors"
    save_file({"w": np.zeros(MODEL_BYTES // 4, np.float32)}, initial)
    spec = RunSpec(federation="single", run_id=uuid.uuid4().hex, app_name="slow_plus_one", sites=fed.sites,
                   num_rounds=1, min_clients=len(fed.sites), train_config={"sleep_s": 0})
    store = SnapshotStore(f"file://{tmp_path}/snapshots")
    with ScatterGatherRun(spec, load_caller_kit(fed.server_kit), store, initial_model=str(initial)) as run, \
            ThreadPoolExecutor(1) as background:
        progress = run.restore()
        clients = {site: run.sites.client(site) for site in fed.sites}  # the run's own clients, whose transfers count

        scatter = background.submit(run.scatter, progress)
        sent_at_kill, upload_cut_at = restart_relay_mid_transfer(fed, clients, "SubmitTask", MODEL_BYTES // 3)
        flight = scatter.result(120)
        uploads = {site: c.last_transfer for site, c in clients.items()}
        wait_attached(fed, fed.server, fed.sites, since=upload_cut_at)  # the sites came back to the new relay

        # The gather starts once every site has trained, so that the three downloads run side by side
        # and the kill finds each in its middle.
        def trained() -> dict | None:
            ended = {site: client.get_task(flight.task_ids[site]) for site, client in clients.items()}
            return ended if all(state.terminal for state in ended.values()) else None

        trained_states = wait_for("every site's training ended", trained, 60)
        assert all(state.status == "succeeded" for state in trained_states.values()), trained_states
        gather = background.submit(run.gather, flight)
        received_at_kill, download_cut_at = restart_relay_mid_transfer(fed, clients, "FetchResult",
                                                                       MODEL_BYTES // 3)
        states = gather.result(120)
        downloads = {site: c.last_transfer for site, c in clients.items()}
        progress = run.finish_round(progress, flight, states)
    wait_attached(fed, fed.server, fed.sites, since=download_cut_at)

    (record,) = progress.history
    assert record.accepted == list(fed.sites), record.dropped
    assert np.all(np.asarray(progress.weights["w"]) == 1.0)  # every site's whole update came back and was averaged
    for site in fed.sites:
        up, down = uploads[site], downloads[site]
        for transfer in (up, down):
            # One call carried the whole transfer from byte 0, so its count holds every byte that went twice.
            assert transfer.completed and transfer.start_offset == 0, transfer
            assert transfer.payload_bytes > MODEL_BYTES, transfer
            assert transfer.resumed_at, transfer  # it was cut, and taken up again
            # A fraction of the model, not the model again: only what the buffers and flow-control windows
            # on the way held when the relay died.
            assert transfer.repeated_bytes < MODEL_BYTES // 4, transfer
        # The upload went on from what the agent had kept of the bytes sent before the cut, the download
        # from every byte received (bytes still on their way at the kill arrive after it).
        assert 0 < up.resumed_at[-1] <= sent_at_kill[site], (sent_at_kill[site], up)
        assert down.resumed_at[-1] >= received_at_kill[site] > 0, (received_at_kill[site], down)
        print(f"[measured] {site}: {MODEL_BYTES >> 20} MiB upload cut at {sent_at_kill[site] / 2**20:.1f} MiB, "
              f"resumed at {up.resumed_at[-1] / 2**20:.1f} MiB: {up.repeated_bytes / 2**20:.1f} MiB sent twice; "
              f"download cut at {received_at_kill[site] / 2**20:.1f} MiB, resumed at "
              f"{down.resumed_at[-1] / 2**20:.1f} MiB: {down.repeated_bytes / 2**20:.1f} MiB received twice")
        task_id = flight.task_ids[site]
        started = trainings(fed, site, task_id)
        assert started == 1, f"{site} started task {task_id} {started} times"

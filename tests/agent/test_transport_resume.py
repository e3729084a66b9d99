"""Transfers of weights that survive a cut connection, and time out on lack of progress only.

A real agent (mutual TLS on loopback) sits behind a :class:`~link_support.Link`, a TCP
splice that drops every connection after N bytes as a relay killed mid-transfer does.
The app is an echo trainer (custom code, allowed on this site): its result is the global
weights it was given, so a downloaded result proves the upload arrived bit for bit.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import yaml
from link_support import Link  # tests/agent is on sys.path

from flare_provider.client import AgentClient, AgentError
from flare_provider.client.transfer import payload_identity
from flare_provider.wire import agent_pb2
from flare_provider.wire.bundles import build_bundle
from flare_provider.wire.checksums import identity_fields
from flare_provider.wire.chunks import send_payload
from flare_provider.wire.finite_scan import FiniteScan
from flare_provider.wire.tensors import dump_bytes, load_file
from site_agent.site_settings import SiteSettings

SITE = "site-1"
MIB = 1 << 20
MODEL_MIB = 48
BIG_MODEL_MIB = 96  # for cut uploads: what a cut loses is what sat in buffers, a few MiB whatever the model
# What a cut upload may send twice: what was in flight, in socket buffers and the agent's
# HTTP/2 window (which gRPC grows on loopback; 0 to 14 MiB measured), and the chunks the
# agent's write-behind thread had not written yet (up to 5 MiB; a SIGKILLed agent loses
# them: 26 MiB measured in all under a loaded CI run). Starting over would send the half
# before the cut, 48 MiB, again, and more.
IN_FLIGHT_BOUND = 36 * MIB
IDLE_S = 3.0  # the idle timeout of the slow-link test
ECHO_TRAINER = '''
from site_agent.trainer import Trainer, TrainResult


class Echo(Trainer):
    """Returns the global weights as they came: the result shows what the upload delivered."""

    def train(self, weights, ctx):
        return TrainResult(dict(weights), num_samples=1)
'''


def model(seed: int, mib: int = MODEL_MIB) -> tuple[np.ndarray, bytes]:
    """A float32 tensor of ``mib`` MiB of random values, and its safetensors bytes."""
    values = np.random.default_rng(seed).standard_normal((mib, MIB // 4), dtype=np.float32)
    return values, dump_bytes({"w": values})


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def report(what: str, stats) -> None:
    print(
        f"\n{what}: payload {stats.payload_bytes} B, moved {stats.transferred_bytes} B, "
        f"repeated {stats.repeated_bytes} B ({stats.repeated_bytes / stats.payload_bytes:.2%}), "
        f"attempts {stats.attempts}, resumed at {stats.resumed_at}"
    )


@pytest.fixture(scope="module")
def agent(federation, make_agent, wait_until):
    """site-1's agent, listening on its port, with custom code allowed (for the echo trainer)."""
    settings_file = federation.kits[SITE] / "local" / "site.yaml"
    settings = yaml.safe_load(settings_file.read_text())
    settings["allow_custom_code"] = True
    if "connect" in SiteSettings.__dataclass_fields__:  # a site that could dial out to relays listens here
        settings["connect"] = "listen"
    settings_file.write_text(yaml.safe_dump(settings))
    process = make_agent(SITE).start(wait=False)
    wait_for_agent(federation, process, wait_until)
    return process


def wait_for_agent(federation, process, wait_until) -> None:
    with direct_client(federation, timeout=2.0) as probe:

        def answers() -> bool:
            assert process.alive, process.log_tail()
            try:
                probe.status()
                return True
            except AgentError:
                return False

        wait_until(answers, 60, f"the agent of {SITE} answering")


def direct_client(federation, address: str | None = None, **kwargs) -> AgentClient:
    """A client with the server identity, at ``address`` (default: the agent's own port)."""
    pems = (federation.pem(federation.server, "crt"), federation.pem(federation.server, "key"),
            federation.pem(federation.server, "rootCA"))
    return AgentClient(SITE, address or federation.address(SITE), *pems, **kwargs)


@pytest.fixture(scope="module")
def echo_app(federation, agent, tmp_path_factory):
    folder = tmp_path_factory.mktemp("echo_app")
    (folder / "custom").mkdir()
    (folder / "app.yaml").write_text("name: echo\ntrainer:\n  path: echo_trainer.Echo\n")
    (folder / "custom" / "echo_trainer.py").write_text(ECHO_TRAINER)
    bundle = build_bundle(folder, federation.pem(federation.server, "crt"), federation.pem(federation.server, "key"))
    with direct_client(federation) as client:
        app, _ = client.deploy_app(bundle)
    return app.name


@pytest.fixture
def link(federation, agent):
    link = Link(federation.ports[SITE])
    yield link
    link.close()


def trained_result(federation, task_id: str, dest) -> np.ndarray:
    """Wait for the echo task, download its result directly, return its tensor."""
    with direct_client(federation) as client:
        states = list(client.watch_task(task_id, timeout=120))
        assert states and states[-1].status == "succeeded", states[-1:]
        client.fetch_result(task_id, dest)
    return load_file(dest)["w"]


def kept_uploads(agent) -> list[str]:
    return sorted(p.name for p in (agent.work_dir / "incoming").glob(".upload-*"))


def test_large_weights_and_results_are_checked_with_xxh3_small_weights_with_sha256(federation, agent, echo_app, tmp_path):
    with direct_client(federation) as client:
        assert client.status().payload_checksums == ["xxh3-128"]
        for task_id, mib, upload_checksum in (("checksum-small", 1, "sha256"), ("checksum-large", 8, "xxh3-128")):
            values, weights = model(seed=mib, mib=mib)
            _, created = client.submit_task(task_id, echo_app, weights, 1)
            assert created and client.last_transfer.checksum == upload_checksum, task_id
            assert list(client.watch_task(task_id, timeout=120))[-1].status == "succeeded"
            dest = tmp_path / f"{task_id}.safetensors"
            client.fetch_result(task_id, dest)
            assert client.last_transfer.checksum == "xxh3-128", "results are checked with XXH3 whatever their size"
            assert same_bits(load_file(dest)["w"], values), task_id
            client.acknowledge(task_id)


def test_status_lists_no_relay_attachments_for_a_site_that_listens(federation, agent):
    with direct_client(federation) as client:
        assert client.status().attachments == []


# ---- cut in the middle -------------------------------------------------------------------


def test_upload_cut_in_the_middle_resumes_and_sends_only_the_rest(federation, agent, echo_app, link, tmp_path):
    values, weights = model(seed=1, mib=BIG_MODEL_MIB)
    link.cut_after(len(weights) // 2, "up")
    with direct_client(federation, link.address) as client:
        state, created = client.submit_task("resume-up", echo_app, weights, 1)
        stats = client.last_transfer
    report("upload cut at half", stats)
    assert created and link.cuts == 1
    assert stats.completed and stats.payload_bytes == len(weights) and stats.start_offset == 0
    assert stats.resumed_at and 0 < stats.resumed_at[0] < len(weights)
    assert stats.repeated_bytes < IN_FLIGHT_BOUND, "resuming sent much of the model again"
    assert "resumed at byte" in agent.log_tail(200)
    assert same_bits(trained_result(federation, "resume-up", tmp_path / "result.safetensors"), values)
    assert kept_uploads(agent) == []


def test_download_cut_in_the_middle_resumes_and_fetches_only_the_rest(federation, agent, echo_app, link, tmp_path):
    values, weights = model(seed=2)
    with direct_client(federation) as client:
        client.submit_task("resume-down", echo_app, weights, 1)
    whole = trained_result(federation, "resume-down", tmp_path / "uncut.safetensors")
    dest = tmp_path / "result.safetensors"
    link.cut_after(len(weights) // 2, "down")
    scan = FiniteScan()
    with direct_client(federation, link.address) as client:
        state = client.fetch_result("resume-down", dest, scan=scan)
        stats = client.last_transfer
    report("download cut at half", stats)
    assert state.task_id == "resume-down" and link.cuts == 1
    assert scan.counts() == {"w": 0}, "the scan goes on where the cut left it, in the same call"
    assert stats.completed and stats.resumed_at and 0 < stats.resumed_at[0] < stats.payload_bytes
    assert stats.repeated_bytes < 0.1 * stats.payload_bytes, "resuming fetched much of the result again"
    assert dest.read_bytes() == (tmp_path / "uncut.safetensors").read_bytes()
    assert same_bits(load_file(dest)["w"], whole) and same_bits(whole, values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.safetensors", "uncut.safetensors"]  # no .part left


def test_upload_survives_an_agent_killed_and_restarted_mid_transfer(federation, agent, echo_app, link, wait_until, tmp_path):
    values, weights = model(seed=3, mib=BIG_MODEL_MIB)
    restarted = threading.Event()

    def kill_and_restart() -> None:  # in the link's thread, at the cut: the agent dies with the connection
        agent.kill()
        threading.Thread(target=lambda: (agent.start(wait=False), restarted.set()), daemon=True).start()

    link.cut_after(len(weights) // 2, "up", on_cut=kill_and_restart)
    with direct_client(federation, link.address, resume_attempts=8) as client:
        state, created = client.submit_task("resume-restart", echo_app, weights, 1)
        stats = client.last_transfer
    report("upload across an agent restart", stats)
    assert restarted.is_set() and created
    assert stats.resumed_at and stats.resumed_at[-1] > 0, "the upload started over after the restart"
    # Lost with the agent: what sat in its buffers and the link's. Bounded by those, not by the model's size.
    assert stats.repeated_bytes < IN_FLIGHT_BOUND
    assert same_bits(trained_result(federation, "resume-restart", tmp_path / "result.safetensors"), values)


def test_a_later_call_resumes_what_an_earlier_call_left(federation, agent, echo_app, link, tmp_path):
    values, weights = model(seed=8)
    link.cut_after(len(weights) // 2, "up", stay_down=True)  # the link stays down: the first call gives up
    with direct_client(federation, link.address, resume_attempts=1) as client:
        with pytest.raises(AgentError):
            client.submit_task("resume-later", echo_app, weights, 1)
    with direct_client(federation) as client:
        kept = client._upload_offset("resume-later", *_identity(client, weights)[:2])
        assert 0 < kept < len(weights)
        state, created = client.submit_task("resume-later", echo_app, weights, 1)
        stats = client.last_transfer
    report("upload resumed by a later call", stats)
    # The first stream is refused at once with the count kept; the second sends the rest.
    assert created and stats.start_offset == kept and stats.resumed_at == [kept]
    assert stats.repeated_bytes < IN_FLIGHT_BOUND
    assert same_bits(trained_result(federation, "resume-later", tmp_path / "result.safetensors"), values)


def test_a_download_resumed_by_a_later_call_completes_but_has_no_finite_counts(federation, agent, echo_app, link,
                                                                               tmp_path):
    values, weights = model(seed=9)
    with direct_client(federation) as client:
        client.submit_task("resume-down-later", echo_app, weights, 1)
    trained_result(federation, "resume-down-later", tmp_path / "uncut.safetensors")
    dest = tmp_path / "result.safetensors"
    link.cut_after(len(weights) // 2, "down", stay_down=True)
    with direct_client(federation, link.address, resume_attempts=1) as client:
        with pytest.raises(AgentError):
            client.fetch_result("resume-down-later", dest, scan=FiniteScan())
    scan = FiniteScan()
    with direct_client(federation) as client:
        client.fetch_result("resume-down-later", dest, scan=scan)
        assert 0 < client.last_transfer.start_offset < len(weights)
    assert same_bits(load_file(dest)["w"], values)
    # The first half arrived in the earlier call, unseen by this scan: no counts, so the
    # aggregator reads the file to count them itself.
    assert scan.counts() is None


def test_a_payload_with_another_digest_never_resumes_anothers_bytes(federation, agent, echo_app, link, tmp_path):
    first_values, first = model(seed=4)
    second_values, second = model(seed=5)
    assert len(first) == len(second)
    # The first payload is cut, and the link stays down: the client gives up, the agent keeps half.
    link.cut_after(len(first) // 2, "up", stay_down=True)
    with direct_client(federation, link.address, resume_attempts=1) as client:
        with pytest.raises(AgentError) as info:
            client.submit_task("resume-other", echo_app, first, 1)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with direct_client(federation) as client:
        kept = client._upload_offset("resume-other", *_identity(client, first)[:2])
        assert 0 < kept < len(first)
        assert client._upload_offset("resume-other", *_identity(client, second)[:2]) == 0
        # Chunks of the second payload that claim to continue the first one's bytes are refused.
        _, fields, checksum, digest = _identity(client, second)
        header = agent_pb2.SubmitTaskHeader(task_id="resume-other", app_name=echo_app, round=1, kind="train", **fields)
        messages = send_payload(agent_pb2.SubmitTaskRequest, header, second, offset=kept, digest=digest, checksum=checksum)
        with pytest.raises(grpc.RpcError) as refused:
            client._stub.SubmitTask(messages, timeout=30)
        assert refused.value.code() == grpc.StatusCode.ABORTED and "holds 0 bytes" in refused.value.details()
        # The second payload goes up whole, and the task gets exactly it.
        state, created = client.submit_task("resume-other", echo_app, second, 1)
        stats = client.last_transfer
    assert created and stats.start_offset == 0 and stats.transferred_bytes == len(second)
    assert same_bits(trained_result(federation, "resume-other", tmp_path / "result.safetensors"), second_values)
    assert kept_uploads(agent) == [], "the first payload's bytes outlived the task"


def _identity(client: AgentClient, payload: bytes) -> tuple[int, dict[str, str], str, str]:
    """Size, identity fields, checksum and digest of ``payload`` as ``client`` uploads it to its agent."""
    checksum = client._upload_checksum(len(payload))
    size, digest = payload_identity(payload, checksum)
    return size, identity_fields(checksum, digest), checksum, digest


# ---- idle timeouts ---------------------------------------------------------------------------


def test_a_slow_transfer_with_steady_progress_outlasts_the_idle_timeout(federation, agent, echo_app, link, tmp_path):
    """Each way takes well over the idle timeout (the old total timeout would have ended it): bytes keep moving."""
    values, weights = model(seed=6, mib=8)
    link.rate = 1.0 * MIB
    with direct_client(federation, link.address, idle_timeout=IDLE_S) as client:
        started = time.monotonic()
        client.submit_task("slow-up", echo_app, weights, 1)
        upload_s = time.monotonic() - started
        link.rate = None
        states = list(client.watch_task("slow-up", timeout=120))
        assert states[-1].status == "succeeded", states[-1]
        link.rate = 1.0 * MIB
        started = time.monotonic()
        client.fetch_result("slow-up", tmp_path / "result.safetensors")
        download_s = time.monotonic() - started
    print(f"\nslow link: upload {upload_s:.1f} s, download {download_s:.1f} s, idle_timeout {IDLE_S:g} s")
    assert upload_s > 2 * IDLE_S and download_s > 2 * IDLE_S, "the link was not slow enough to show anything"
    assert same_bits(load_file(tmp_path / "result.safetensors")["w"], values)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_stalled_transfer_fails_naming_the_site_and_the_idle_time(federation, agent, echo_app, link, direction, tmp_path):
    values, weights = model(seed=7, mib=16)
    task_id = f"stalled-{direction}"
    if direction == "down":
        with direct_client(federation) as client:
            client.submit_task(task_id, echo_app, weights, 1)
            assert list(client.watch_task(task_id, timeout=120))[-1].status == "succeeded"
    link.stall_after(4 * MIB, direction)  # some bytes move, then none
    with direct_client(federation, link.address, idle_timeout=1.5) as client:
        started = time.monotonic()
        with pytest.raises(AgentError) as info:
            if direction == "up":
                client.submit_task(task_id, echo_app, weights, 1)
            else:
                client.fetch_result(task_id, tmp_path / "result.safetensors")
        waited = time.monotonic() - started
    link.restore()
    error = info.value
    print(f"\nstalled {direction}: failed after {waited:.1f} s: {error}")
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "site 'site-1'" in str(error) and "nothing moved for 1.5 s (idle_timeout)" in str(error)
    assert waited < 15


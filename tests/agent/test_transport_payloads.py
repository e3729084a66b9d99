"""Bad uploads to a real agent: each is refused with a clear error and leaves nothing behind."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from flare_provider.client import AgentError
from flare_provider.wire import agent_pb2
from flare_provider.wire.chunks import send_payload
from flare_provider.wire.tensors import dump_bytes

WEIGHTS_LIMIT = 64 << 10
BUNDLE_LIMIT = 48 << 10
WEIGHTS = dump_bytes({"w": np.ones((4, 4), np.float32)})


@pytest.fixture(scope="module")
def agent(make_agent):
    """site-1's agent with small upload limits, so that oversized payloads stay small."""
    return make_agent("site-1", "--max-weights-bytes", "64K", "--max-bundle-bytes", str(BUNDLE_LIMIT)).start()


@pytest.fixture(scope="module")
def client(federation, agent):
    with federation.client("site-1", chunk_size=4096) as client:
        yield client


@pytest.fixture(scope="module")
def deployed(client, federation):
    app, newly = client.deploy_app(federation.bundle("digits"))
    return app


@pytest.fixture(autouse=True)
def nothing_left_behind(agent):
    """After every test: no partial upload, no task from a refused submission, no stray app."""
    yield
    leftovers = [p.name for p in (agent.work_dir / "incoming").iterdir()]
    assert leftovers == [], f"partial uploads left behind: {leftovers}"
    tasks = [p.name for p in (agent.work_dir / "tasks").iterdir()]
    assert tasks == [], f"refused submissions left tasks behind: {tasks}"
    apps = {p.name for p in (agent.work_dir / "apps").iterdir()}
    assert apps <= {"digits", "digits_custom"}, f"refused bundles left apps behind: {apps}"


def submission(task_id="t-1", app="digits", data=WEIGHTS, chunk_size=1024, **header) -> list:
    head = agent_pb2.SubmitTaskHeader(task_id=task_id, app_name=app, round=1, kind="train", **header)
    return list(send_payload(agent_pb2.SubmitTaskRequest, head, data, chunk_size))


def raw_submit(client, messages) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        client._stub.SubmitTask(iter(messages), timeout=30)
    return info.value


def expect(code, error: grpc.RpcError, *words):
    assert error.code() == code, error.details()
    for word in words:
        assert word in error.details(), error.details()


def test_truncated_upload(client, deployed):
    messages = submission()
    error = raw_submit(client, messages[:-2])  # the last chunk and the end marker never come
    expect(grpc.StatusCode.INVALID_ARGUMENT, error, "global weights of task t-1", "truncated")


def test_checksum_mismatch(client, deployed):
    messages = submission()
    messages[1].chunk.data = bytes(len(messages[1].chunk.data))
    expect(grpc.StatusCode.INVALID_ARGUMENT, raw_submit(client, messages), "SHA-256 mismatch")


def test_chunks_out_of_order(client, deployed):
    messages = submission(data=WEIGHTS + bytes(2048))
    messages[1], messages[2] = messages[2], messages[1]
    expect(grpc.StatusCode.INVALID_ARGUMENT, raw_submit(client, messages), "out of order")


def test_stream_without_header(client, deployed):
    expect(grpc.StatusCode.INVALID_ARGUMENT, raw_submit(client, submission()[1:]), "must start with a header")


def test_oversized_weights(client, deployed):
    big = dump_bytes({"w": np.zeros(20_000, np.float32)})  # 80 KB > 64 KiB
    with pytest.raises(AgentError) as info:
        client.submit_task("t-big", "digits", big, 1)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "global weights of task t-big" in info.value.details and "limit of 65536 bytes (64 KiB)" in info.value.details


def test_oversized_bundle(client):
    with pytest.raises(AgentError) as info:
        client.deploy_app(bytes(BUNDLE_LIMIT + 1))
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "app bundle" in info.value.details


def test_malformed_safetensors(client, deployed):
    with pytest.raises(AgentError) as info:
        client.submit_task("t-bad", "digits", b"these are not weights", 1)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "task t-bad" in info.value.details and "safetensors" in info.value.details


def test_unknown_app(client):
    with pytest.raises(AgentError) as info:
        client.submit_task("t-unknown", "no-such-app", WEIGHTS, 1)
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "no-such-app" in info.value.details


def test_unknown_app_version(client, deployed):
    with pytest.raises(AgentError) as info:
        client.submit_task("t-version", "digits", WEIGHTS, 1, app_version="0" * 64)
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "no version" in info.value.details


def test_bad_task_requests(client, deployed):
    expect(grpc.StatusCode.INVALID_ARGUMENT, raw_submit(client, submission(config_json="{not json")), "config is not valid JSON")
    expect(grpc.StatusCode.INVALID_ARGUMENT, raw_submit(client, submission(config_json="[1, 2]")), "config must be a JSON object")
    for bad in (dict(task_id="../escape"), dict(kind="destroy")):
        with pytest.raises(AgentError) as info:
            client.submit_task(bad.get("task_id", "t-kind"), "digits", WEIGHTS, 1, kind=bad.get("kind", "train"))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_more_gpus_than_the_site_has(client, deployed):
    with pytest.raises(AgentError) as info:
        client.submit_task("t-gpus", "digits", WEIGHTS, 1, num_gpus=2)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "GPU" in info.value.details


def test_custom_code_refused_without_the_sites_opt_in(client, federation):
    client.deploy_app(federation.bundle("digits_custom"))
    with pytest.raises(AgentError) as info:
        client.submit_task("t-custom", "digits_custom", WEIGHTS, 1)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "allow_custom_code" in info.value.details


def test_bundle_not_a_zip(client):
    with pytest.raises(AgentError) as info:
        client.deploy_app(b"PK\x03\x04 not really a zip")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "app bundle" in info.value.details


def test_bundle_signed_by_a_site_is_refused(client, federation):
    with pytest.raises(AgentError) as info:
        client.deploy_app(federation.bundle("digits", signer="site-2"))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_queries_about_unknown_tasks(client, tmp_path):
    for call in (client.get_task, client.acknowledge, client.abort):
        with pytest.raises(AgentError) as info:
            call("never-submitted")
        assert info.value.code == grpc.StatusCode.NOT_FOUND and "never-submitted" in info.value.details
    with pytest.raises(AgentError) as info:
        list(client.watch_task("never-submitted", timeout=10))
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(AgentError) as info:
        client.fetch_result("never-submitted", tmp_path / "result.safetensors")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert list(tmp_path.iterdir()) == []

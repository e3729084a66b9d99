"""Hostile requests from an authenticated caller, through a real gRPC channel to one real agent.

One ``flare-agent start`` process (mutual TLS, the server identity's certificate) serves
the whole module; it holds the digits app and one finished task. Every request below is
one the server identity may send, with hostile fields: task ids, config JSON, offsets and
sizes of chunks, sequence numbers, bundle bytes. The agent must answer each with a gRPC
status other than INTERNAL/UNKNOWN and a message naming what was wrong, keep serving,
and leave its task store and app store as they were.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc
import pytest
from hostile_support import broken_bytes, hostile_text, hostile_values, json_safe
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flare_provider import poc
from flare_provider.client import load_caller_kit
from flare_provider.client.channel import channel_credentials, channel_options
from flare_provider.wire import agent_pb2, agent_pb2_grpc
from flare_provider.wire.tensors import dump_bytes

SITE = "site-1"
APP = Path(__file__).resolve().parents[2] / "examples" / "apps" / "digits"
CALL_TIMEOUT = 20.0
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
            grpc.StatusCode.DATA_LOSS}
GRPC_EXAMPLES = settings(max_examples=30)


def utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


texts = st.one_of(hostile_text, st.sampled_from(["", "t-1", "a" * 129, "t-1\n", ".hidden", "../t"])).filter(utf8)
u64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1, 8 << 30, (8 << 30) + 1]))
i64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, 2**63 - 1]))
i32 = st.integers(-(2**31), 2**31 - 1)
sha = st.one_of(st.sampled_from(["", "0" * 64, "F" * 64, "0" * 63, "0" * 64 + "\n"]), texts)


class Agent:
    """The module's agent, a raw stub with the server identity, and what its stores hold."""

    def __init__(self, federation: poc.LocalFederation):
        self.federation = federation
        self.federation.start_agents()
        self.process = self.federation.agent(SITE)
        self.work = self.federation.kits[SITE] / "work"
        kit = load_caller_kit(self.federation.server_kit)
        self.channel = grpc.secure_channel(f"127.0.0.1:{self.federation.ports[SITE]}",
                                           channel_credentials(kit.cert_pem, kit.key_pem, kit.root_ca_pem),
                                           options=channel_options(SITE))
        self.stub = agent_pb2_grpc.FlareAgentStub(self.channel)
        self.app_version = self.federation.deploy_app(APP)
        with kit.client(SITE) as client:
            self.task_id = "props-init-1"
            client.submit_task(self.task_id, "digits", dump_bytes({}), 0, kind="initialize", config={"seed_round": 0})
            for state in client.watch_task(self.task_id, timeout=120):
                if state.status in ("succeeded", "failed", "aborted"):
                    break
            assert state.status == "succeeded" and state.result_available, state
        self.state = self.stores()

    def stores(self) -> dict[str, str]:
        """Every file of the task and app stores, with its digest (the audit log and uploads aside)."""
        found = {}
        for folder in ("tasks", "apps"):
            for path in sorted((self.work / folder).rglob("*")):
                if path.is_file() and path.name not in ("agent.lock",):
                    found[path.relative_to(self.work).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
        return found

    def refuses(self, call, *subjects: str) -> None:
        """``call()`` fails with a clear refusal naming one of ``subjects``; the agent serves on, unchanged."""
        try:
            reply = call()
            if hasattr(reply, "__next__"):
                reply = list(reply)
        except grpc.RpcError as exc:
            assert exc.code() in REFUSALS, f"{exc.code()}: {exc.details()}"
            details = exc.details() or ""
            assert "internal error" not in details and any(s in details for s in subjects), details
        self.stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=CALL_TIMEOUT)  # still serving
        assert self.process.alive
        assert self.stores() == self.state, "a refused request changed the agent's task or app store"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    federation = poc.prepare(tmp_path_factory.mktemp("agent-props"), "props", 1, non_iid=False)
    try:
        agent = Agent(federation)
        yield agent
        agent.channel.close()
    finally:
        federation.stop_agents()


def submit_messages(header: agent_pb2.SubmitTaskHeader, chunks, end) -> list:
    messages = [agent_pb2.SubmitTaskRequest(header=header)]
    messages += [agent_pb2.SubmitTaskRequest(chunk=agent_pb2.DataChunk(offset=o, data=d)) for o, d in chunks]
    if end is not None:
        messages.append(agent_pb2.SubmitTaskRequest(end=agent_pb2.PayloadEnd(size=end[0], sha256=end[1])))
    return messages


@GRPC_EXAMPLES
@given(task_id=texts, app_name=st.one_of(st.just("digits"), texts), round_=i64, kind=st.one_of(
    st.sampled_from(["train", "evaluate", "initialize", ""]), texts), config=st.one_of(
    hostile_values().map(lambda v: json.dumps(json_safe(v))), st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["[" * 100_000, "{}", '{"a": NaN}', "1" * 5000])), num_gpus=st.one_of(st.none(), i32))
@example(task_id="t-1\n", app_name="digits", round_=0, kind="train", config="{}", num_gpus=None).via("was accepted")
@example(task_id="t-2", app_name="digits", round_=0, kind="train", config="[" * 100_000, num_gpus=None).via(
    "was INTERNAL (RecursionError)")
def test_a_submit_header_with_hostile_fields(agent, task_id, app_name, round_, kind, config, num_gpus):
    weights = dump_bytes({})
    header = agent_pb2.SubmitTaskHeader(task_id=task_id, app_name=app_name, round=round_, kind=kind,
                                        config_json=config, app_version="0" * 64, payload_size=len(weights))
    if num_gpus is not None:
        header.num_gpus = num_gpus
    messages = submit_messages(header, [(0, weights)], (len(weights), hashlib.sha256(weights).hexdigest()))
    agent.refuses(lambda: agent.stub.SubmitTask(iter(messages), timeout=CALL_TIMEOUT), "task", "app")


@GRPC_EXAMPLES
@given(size=u64, digest=sha, offset=u64, chunks=st.lists(st.tuples(u64, st.binary(max_size=40)), max_size=4),
       end=st.one_of(st.none(), st.tuples(u64, sha)))
@example(size=10, digest="0" * 64, offset=20, chunks=[], end=(10, "0" * 64))
@example(size=2**64 - 1, digest="", offset=0, chunks=[(0, b"x")], end=None)
def test_a_submit_stream_with_hostile_sizes_offsets_and_chunks(agent, size, digest, offset, chunks, end):
    header = agent_pb2.SubmitTaskHeader(task_id="stream-1", app_name="digits", kind="train", payload_size=size,
                                        payload_sha256=digest, offset=offset)
    messages = submit_messages(header, chunks, end)
    agent.refuses(lambda: agent.stub.SubmitTask(iter(messages), timeout=CALL_TIMEOUT),
                  "global weights", "task", "payload", "app")


@GRPC_EXAMPLES
@given(first=st.sampled_from(["chunk", "end", "none"]), size=u64)
def test_a_stream_that_does_not_start_with_a_header(agent, first, size):
    message = {"chunk": agent_pb2.SubmitTaskRequest(chunk=agent_pb2.DataChunk(offset=size, data=b"x")),
               "end": agent_pb2.SubmitTaskRequest(end=agent_pb2.PayloadEnd(size=size)),
               "none": agent_pb2.SubmitTaskRequest()}[first]
    agent.refuses(lambda: agent.stub.SubmitTask(iter([message]), timeout=CALL_TIMEOUT), "task submission")
    deploy = {"chunk": agent_pb2.DeployAppRequest(chunk=agent_pb2.DataChunk(offset=size, data=b"x")),
              "end": agent_pb2.DeployAppRequest(end=agent_pb2.PayloadEnd(size=size)),
              "none": agent_pb2.DeployAppRequest()}[first]
    agent.refuses(lambda: agent.stub.DeployApp(iter([deploy]), timeout=CALL_TIMEOUT), "app bundle")


@GRPC_EXAMPLES
@given(task_id=st.one_of(st.just("props-init-1"), texts), size=u64, digest=sha)
def test_an_upload_offset_question_with_hostile_fields(agent, task_id, size, digest):
    def ask():
        reply = agent.stub.GetUploadOffset(
            agent_pb2.UploadOffsetRequest(task_id=task_id, payload_size=size, payload_sha256=digest), timeout=CALL_TIMEOUT)
        assert reply.offset <= size
        return reply

    agent.refuses(ask, "task", "global weights")


@GRPC_EXAMPLES
@given(task_id=st.one_of(st.just("props-init-1"), texts), offset=u64, after=u64)
@example(task_id="props-init-1", offset=2**64 - 1, after=0)
@example(task_id="props-init-1\n", offset=0, after=0)
def test_reading_a_task_with_hostile_ids_offsets_and_sequence_numbers(agent, task_id, offset, after):
    agent.refuses(lambda: agent.stub.GetTask(agent_pb2.TaskRef(task_id=task_id), timeout=CALL_TIMEOUT), "task")
    agent.refuses(lambda: agent.stub.WatchTask(agent_pb2.WatchTaskRequest(task_id=task_id, after_seq=after),
                                               timeout=CALL_TIMEOUT), "task")
    agent.refuses(lambda: agent.stub.FetchResult(agent_pb2.FetchResultRequest(task_id=task_id, offset=offset),
                                                 timeout=CALL_TIMEOUT), "task", "result")


@GRPC_EXAMPLES
@given(task_id=texts.filter(lambda t: t != "props-init-1"))
def test_acknowledging_or_aborting_an_unknown_task(agent, task_id):
    agent.refuses(lambda: agent.stub.AcknowledgeResult(agent_pb2.TaskRef(task_id=task_id), timeout=CALL_TIMEOUT), "task")
    agent.refuses(lambda: agent.stub.AbortTask(agent_pb2.TaskRef(task_id=task_id), timeout=CALL_TIMEOUT), "task")


@GRPC_EXAMPLES
@given(bundle=st.one_of(broken_bytes, st.binary(min_size=22, max_size=300).map(lambda b: b"PK\x03\x04" + b)),
       announced=st.one_of(st.none(), u64))
def test_deploying_hostile_bundle_bytes(agent, bundle, announced):
    size = len(bundle) if announced is None else announced
    messages = [agent_pb2.DeployAppRequest(header=agent_pb2.DeployAppHeader(payload_size=size)),
                agent_pb2.DeployAppRequest(chunk=agent_pb2.DataChunk(offset=0, data=bundle)),
                agent_pb2.DeployAppRequest(end=agent_pb2.PayloadEnd(size=len(bundle),
                                                                    sha256=hashlib.sha256(bundle).hexdigest()))]
    agent.refuses(lambda: agent.stub.DeployApp(iter(messages), timeout=CALL_TIMEOUT), "app bundle")


def test_a_task_id_with_a_final_newline_is_refused(agent):
    """Regression: ``$`` in the task id pattern let ``"t-1\\n"`` through, into a task folder's name."""
    weights = dump_bytes({})
    header = agent_pb2.SubmitTaskHeader(task_id="t-1\n", app_name="digits", app_version=agent.app_version, round=0,
                                        kind="initialize", config_json='{"seed_round": 0}', payload_size=len(weights))
    messages = submit_messages(header, [(0, weights)], (len(weights), hashlib.sha256(weights).hexdigest()))
    with pytest.raises(grpc.RpcError) as refused:
        agent.stub.SubmitTask(iter(messages), timeout=CALL_TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "task_id must be" in refused.value.details()
    assert agent.stores() == agent.state

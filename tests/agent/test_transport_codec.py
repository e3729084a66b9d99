"""Payload chunks framed by hand, and payloads checked with XXH3-128 (no agent needed).

The chunk codec must put on the wire exactly the bytes protobuf would, and read back any
encoding protobuf accepts, so that either end may be any protobuf implementation.
"""

from __future__ import annotations

import io

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from flare_provider.wire import agent_pb2
from flare_provider.wire.checksums import SHA256, XXH3_128, fastest_shared
from flare_provider.wire.chunks import PayloadError, PayloadWriter, read_header, send_payload
from flare_provider.wire.payload_codec import Chunk, _deserializer, _serializer, encode_chunk

STREAMS = (agent_pb2.DeployAppRequest, agent_pb2.SubmitTaskRequest, agent_pb2.FetchResultReply)


@given(offset=st.integers(0, 2**64 - 1), data=st.binary(max_size=2000), stream=st.sampled_from(STREAMS))
def test_a_chunk_is_framed_exactly_as_protobuf_frames_it(offset, data, stream):
    wire = encode_chunk(Chunk(offset, data))
    assert wire == stream(chunk=agent_pb2.DataChunk(offset=offset, data=data)).SerializeToString()
    decoded = _deserializer(stream)(wire)
    assert type(decoded) is Chunk and (decoded.offset, bytes(decoded.data)) == (offset, data)


def test_the_receiver_hands_on_a_view_of_the_delivered_bytes_not_a_copy():
    wire = encode_chunk(Chunk(5, b"x" * 4096))
    chunk = _deserializer(agent_pb2.SubmitTaskRequest)(wire)
    assert isinstance(chunk.data, memoryview) and chunk.data.obj is wire


def test_a_chunk_in_any_field_order_is_read_and_anything_else_is_left_to_protobuf():
    decode = _deserializer(agent_pb2.SubmitTaskRequest)
    # The chunk's fields in the other order (valid protobuf) are read here as well.
    data = b"abc"
    swapped = b"\x12" + bytes([2 + len(data) + 2]) + b"\x12" + bytes([len(data)]) + data + b"\x08\x07"
    message = decode(swapped)
    assert type(message) is Chunk and (message.chunk.offset, bytes(message.chunk.data)) == (7, data)
    # An unknown field after the chunk: parsed by protobuf, which keeps what it knows.
    unknown = encode_chunk(Chunk(7, data)) + b"\x58\x01"  # field 11, varint
    message = decode(unknown)
    assert not isinstance(message, Chunk) and (message.chunk.offset, message.chunk.data) == (7, data)
    # Headers and end markers go through protobuf both ways.
    serialize = _serializer(agent_pb2.SubmitTaskRequest)
    header = agent_pb2.SubmitTaskRequest(header=agent_pb2.SubmitTaskHeader(task_id="t", payload_size=3))
    assert decode(serialize(header)) == header
    # A chunk cut short is refused by protobuf, not read past its end.
    with pytest.raises(Exception, match="(?i)error parsing|truncated"):
        decode(encode_chunk(Chunk(7, b"x" * 100))[:-10])


def _writer_stream(data: bytes, checksum: str) -> list:
    return list(send_payload(agent_pb2.SubmitTaskRequest, agent_pb2.SubmitTaskHeader(), data, 1000, checksum=checksum))


def _receive(messages: list, checksum: str) -> bytes:
    it = iter(messages)
    header = read_header(it, "weights")
    out = io.BytesIO()
    PayloadWriter(out, header.payload_size, "weights", checksum=checksum).receive(it)
    return out.getvalue()


def test_a_payload_checked_with_xxh3_arrives_whole_and_its_end_marker_says_so():
    data = bytes(range(256)) * 20
    messages = _writer_stream(data, XXH3_128)
    assert messages[-1].end.xxh3_128 == xxhash.xxh3_128_hexdigest(data) and messages[-1].end.sha256 == ""
    assert _receive(messages, XXH3_128) == data


def test_a_damaged_chunk_fails_the_xxh3_check():
    data = bytes(range(256)) * 20
    messages = _writer_stream(data, XXH3_128)
    messages[2].chunk.data = b"\0" * len(messages[2].chunk.data)
    with pytest.raises(PayloadError, match="XXH3-128 mismatch"):
        _receive(messages, XXH3_128)


def test_a_receiver_expecting_xxh3_refuses_an_end_marker_with_sha256_only():
    data = b"w" * 3000
    with pytest.raises(PayloadError, match="XXH3-128 mismatch: the sender says nothing"):
        _receive(_writer_stream(data, SHA256), XXH3_128)


def test_peers_agree_on_xxh3_only_when_both_speak_it():
    assert fastest_shared(["xxh3-128"]) == XXH3_128
    assert fastest_shared([]) == SHA256 == fastest_shared(["md5"])
    with pytest.raises(ValueError, match="unknown checksum 'md5'"):
        send_payload(agent_pb2.SubmitTaskRequest, agent_pb2.SubmitTaskHeader(), b"x", checksum="md5")

"""The agent contract's gRPC stub and handlers, with payload chunks kept out of protobuf.

A data chunk of a payload stream (``part.chunk`` of ``DeployAppRequest``,
``SubmitTaskRequest`` and ``FetchResultReply``) is all payload bytes but a dozen. Built
and parsed as protobuf messages, its bytes were copied three times on each side (into the
``DataChunk``, into the outer message, into the serialized string, and back out). Here a
chunk is a plain :class:`Chunk`: the sender writes its few framing bytes itself and joins
them to the data in one copy, and the receiver reads the offset and hands on a view of the
data inside the message gRPC delivered, with no copy at all. The bytes on the wire are the
protobuf encoding of the same message, so the other end may be any protobuf
implementation; a message of any other shape (header, end marker, fields this code does
not know) is parsed by protobuf as before.

:class:`AgentStub` and :func:`add_agent_servicer` replace the generated
``FlareAgentStub`` and ``add_FlareAgentServicer_to_server``: every method is the same,
only the payload streams' (de)serializers differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from . import agent_pb2

SERVICE = agent_pb2.DESCRIPTOR.services_by_name["FlareAgent"]
# The ``part`` oneof's ``chunk`` member is field 2 in every payload stream message; inside
# it, ``DataChunk`` has ``offset`` (field 1, varint) and ``data`` (field 2, bytes).
_CHUNK_TAG = 0x12  # field 2, length-delimited
_OFFSET_TAG = 0x08  # field 1, varint
_PAYLOAD_STREAMS = frozenset({"DeployAppRequest", "SubmitTaskRequest", "FetchResultReply"})


@dataclass(slots=True)
class Chunk:
    """One data chunk of a payload: where ``data`` starts in the payload, and the bytes.

    It stands in for a payload stream message whose ``part`` is a chunk, and reads like
    one (``WhichOneof("part")``, ``.chunk.offset``, ``.chunk.data``), so that whoever takes
    a payload's messages handles both alike.
    """

    offset: int
    data: bytes | memoryview

    def WhichOneof(self, oneof: str) -> str:  # noqa: N802 - protobuf's name
        return "chunk"

    @property
    def chunk(self) -> "Chunk":
        return self


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; IndexError or ValueError when malformed."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def encode_chunk(chunk: Chunk) -> bytes:
    """The serialized payload message whose ``part`` is ``chunk`` (one copy of its data)."""
    # proto3 leaves out fields that hold their default (offset 0, empty data): so do we.
    inner = bytes((_OFFSET_TAG,)) + _varint(chunk.offset) if chunk.offset else b""
    if len(chunk.data):
        inner += bytes((_CHUNK_TAG,)) + _varint(len(chunk.data))
    return b"".join((bytes((_CHUNK_TAG,)), _varint(len(inner) + len(chunk.data)), inner, chunk.data))


def _decode_chunk(buf: bytes) -> Chunk | None:
    """The chunk ``buf`` holds when it is exactly a ``part.chunk`` message; None otherwise."""
    try:
        if buf[0] != _CHUNK_TAG:
            return None
        length, pos = _read_varint(buf, 1)
        if pos + length != len(buf):  # anything after the chunk: leave it to protobuf
            return None
        offset, data = 0, b""
        while pos < len(buf):
            tag = buf[pos]
            if tag == _OFFSET_TAG:
                offset, pos = _read_varint(buf, pos + 1)
            elif tag == _CHUNK_TAG:
                size, pos = _read_varint(buf, pos + 1)
                if pos + size > len(buf):
                    return None
                data, pos = memoryview(buf)[pos : pos + size], pos + size
            else:
                return None
        return Chunk(offset, data)
    except (IndexError, ValueError):
        return None


def _serializer(message_type):
    if message_type.DESCRIPTOR.name not in _PAYLOAD_STREAMS:
        return message_type.SerializeToString

    def serialize(message) -> bytes:
        return encode_chunk(message) if type(message) is Chunk else message.SerializeToString()

    return serialize


def _deserializer(message_type):
    if message_type.DESCRIPTOR.name not in _PAYLOAD_STREAMS:
        return message_type.FromString

    def deserialize(buf: bytes):
        chunk = _decode_chunk(buf)
        return chunk if chunk is not None else message_type.FromString(buf)

    return deserialize


def _message_class(descriptor):
    return getattr(agent_pb2, descriptor.name)


_KINDS = {  # (client streaming, server streaming): (channel method, handler factory)
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class AgentStub:
    """The client side of every ``FlareAgent`` method, on ``channel`` (sync or asyncio)."""

    def __init__(self, channel):
        for method in SERVICE.methods:
            request, response = _message_class(method.input_type), _message_class(method.output_type)
            factory = getattr(channel, _KINDS[method.client_streaming, method.server_streaming][0])
            setattr(self, method.name, factory(
                f"/{SERVICE.full_name}/{method.name}",
                request_serializer=_serializer(request), response_deserializer=_deserializer(response),
                _registered_method=True,
            ))


def add_agent_servicer(servicer, server: grpc.Server) -> None:
    """Serve ``servicer``'s ``FlareAgent`` methods on ``server``."""
    handlers = {}
    for method in SERVICE.methods:
        request, response = _message_class(method.input_type), _message_class(method.output_type)
        factory = _KINDS[method.client_streaming, method.server_streaming][1]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=_deserializer(request), response_serializer=_serializer(response),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)

"""The wire format on its own: the generated contract, chunked payloads, safetensors."""

from __future__ import annotations

import hashlib
import io
import shutil

import numpy as np
import pytest

from flare_provider.wire import agent_pb2, codegen
from flare_provider.wire.chunks import (
    WRITE_BEHIND_BYTES,
    PayloadError,
    PayloadTooLarge,
    PayloadTruncated,
    PayloadWriter,
    read_header,
    receive_payload,
    send_payload,
)
from flare_provider.wire.tensors import (
    RESULT_KIND_KEY,
    TensorFormatError,
    TensorSpec,
    describe_file,
    dump_bytes,
    load_bytes,
    load_file,
    save_file,
)

Request = agent_pb2.SubmitTaskRequest


def stream(data: bytes, chunk_size: int = 1000) -> list:
    return list(send_payload(Request, agent_pb2.SubmitTaskHeader(task_id="t1"), data, chunk_size))


def receive(messages, tmp_path, max_size: int = 1 << 20):
    it = iter(messages)
    header = read_header(it, "weights")
    return header, receive_payload(it, header.payload_size, tmp_path, max_size, "weights")


# ---- generated code ----------------------------------------------------------------


def test_generated_code_is_up_to_date():
    assert codegen.stale_files() == [], "run: python -m flare_provider.wire.codegen"
    assert codegen.main(["--check"]) == 0


def test_check_reports_a_stale_generated_file(tmp_path, monkeypatch, capsys):
    copies = []
    for path in codegen.generated_files():
        copies.append(tmp_path / path.name)
        shutil.copy(path, copies[-1])
    copies[0].write_text(copies[0].read_text() + "\n# edited by hand\n")
    monkeypatch.setattr(codegen, "generated_files", lambda: copies)
    assert codegen.main(["--check"]) == 1
    assert copies[0].name in capsys.readouterr().out


def test_generated_service_imports_messages_from_the_package():
    source = (codegen.WIRE_DIR / "agent_pb2_grpc.py").read_text()
    assert "from flare_provider.wire import agent_pb2" in source


# ---- chunked payloads ----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 25_000])
def test_payload_round_trip(tmp_path, size):
    data = np.random.default_rng(size).bytes(size)
    messages = stream(data)
    assert all(len(m.chunk.data) <= 1000 for m in messages if m.WhichOneof("part") == "chunk")
    header, path = receive(messages, tmp_path)
    assert header.task_id == "t1" and header.payload_size == size
    assert path.read_bytes() == data


def test_payload_from_a_file(tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"x" * 5000)
    messages = list(send_payload(Request, agent_pb2.SubmitTaskHeader(), source, 2048))
    assert [m.WhichOneof("part") for m in messages] == ["header", "chunk", "chunk", "chunk", "end"]
    out = tmp_path / "out"
    out.mkdir()
    assert receive(messages, out)[1].read_bytes() == b"x" * 5000


def assert_refused(tmp_path, messages, error, *words, max_size=1 << 20):
    with pytest.raises(error) as info:
        receive(messages, tmp_path, max_size)
    for word in words:
        assert word in str(info.value)
    assert list(tmp_path.iterdir()) == [], "a refused payload must leave nothing behind"


def test_truncated_stream_is_refused(tmp_path):
    messages = stream(b"a" * 5000)
    assert_refused(tmp_path, messages[:-2], PayloadError, "truncated", "4000 of 5000")


def test_stream_without_header_is_refused(tmp_path):
    with pytest.raises(PayloadError, match="must start with a header"):
        read_header(iter(stream(b"abc")[1:]), "weights")
    with pytest.raises(PayloadError, match="empty"):
        read_header(iter([]), "weights")


def test_checksum_mismatch_is_refused(tmp_path):
    messages = stream(b"a" * 3000)
    messages[2].chunk.data = b"b" * 1000  # same size, other bytes
    assert_refused(tmp_path, messages, PayloadError, "SHA-256 mismatch")


def test_out_of_order_chunks_are_refused(tmp_path):
    messages = stream(b"abc" * 1000)
    messages[1], messages[2] = messages[2], messages[1]
    assert_refused(tmp_path, messages, PayloadError, "offset 1000", "offset 0 was expected")


def test_lost_chunk_is_refused(tmp_path):
    messages = stream(b"abc" * 1000)
    del messages[2]
    assert_refused(tmp_path, messages, PayloadError, "out of order")


def test_oversized_payload_is_refused_from_its_header(tmp_path):
    assert_refused(tmp_path, stream(b"a" * 5000), PayloadTooLarge, "5000 bytes", "limit of 4096 bytes (4 KiB)", max_size=4096)


def test_more_data_than_announced_is_refused(tmp_path):
    messages = stream(b"a" * 5000)
    messages[0].header.payload_size = 1500  # a sender understating its size gets no further than that
    assert_refused(tmp_path, messages, PayloadError, "more data than the 1500 bytes announced", max_size=4096)


def test_anything_after_the_end_is_refused(tmp_path):
    messages = stream(b"a" * 1500)
    messages.append(messages[1])
    assert_refused(tmp_path, messages, PayloadError, "followed the end")


def test_wrong_size_in_end_marker_is_refused(tmp_path):
    messages = stream(b"a" * 1500)
    messages[-1].end.size = 2000
    assert_refused(tmp_path, messages, PayloadError, "size mismatch")


# A payload over WRITE_BEHIND_BYTES is written and hashed by a second thread: the same
# checks, the same file, and counters that say exactly what the file holds.
BIG = WRITE_BEHIND_BYTES + 300_000
BIG_CHUNK = 1 << 18


def big_stream(data: bytes) -> list:
    return list(send_payload(Request, agent_pb2.SubmitTaskHeader(task_id="t1"), data, BIG_CHUNK))


def test_a_large_payload_is_written_behind_and_arrives_whole(tmp_path):
    data = np.random.default_rng(1).bytes(BIG)
    header, path = receive(big_stream(data), tmp_path, max_size=4 * BIG)
    assert path.read_bytes() == data


@pytest.mark.parametrize("damage, error, words", [
    (lambda m: m.__setitem__(5, agent_pb2.SubmitTaskRequest(chunk=agent_pb2.DataChunk(offset=m[5].chunk.offset, data=b"x" * BIG_CHUNK))),
     PayloadError, ["SHA-256 mismatch"]),
    (lambda m: m.__delitem__(3), PayloadError, ["out of order"]),
    (lambda m: m.__delitem__(-1), PayloadTruncated, ["truncated", f"of {BIG}"]),
])
def test_a_large_payload_damaged_is_refused_and_leaves_nothing(tmp_path, damage, error, words):
    messages = big_stream(np.random.default_rng(2).bytes(BIG))
    damage(messages)
    assert_refused(tmp_path, messages, error, *words, max_size=4 * BIG)


class FailingFile(io.BytesIO):
    """A file whose writes fail once it holds ``limit`` bytes (a full disk)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def write(self, data) -> int:
        if self.tell() + len(data) > self.limit:
            raise OSError(28, "No space left on device")
        return super().write(data)


def test_a_write_failing_behind_is_raised_to_the_receiver_with_exact_counters():
    data = np.random.default_rng(3).bytes(BIG)
    messages = iter(big_stream(data))
    header = read_header(messages, "weights")
    out = FailingFile(limit=3 * BIG_CHUNK)
    writer = PayloadWriter(out, header.payload_size, "weights")
    with pytest.raises(OSError, match="No space left"):
        writer.receive(messages)
    assert writer.received == len(out.getvalue()) == 3 * BIG_CHUNK
    assert writer.digest.hexdigest() == hashlib.sha256(data[: 3 * BIG_CHUNK]).hexdigest()


def test_a_large_payload_cut_keeps_counters_that_match_the_file():
    data = np.random.default_rng(4).bytes(BIG)
    messages = big_stream(data)[:-3]  # header, the chunks before the last two, no end
    it = iter(messages)
    header = read_header(it, "weights")
    out = io.BytesIO()
    writer = PayloadWriter(out, header.payload_size, "weights")
    with pytest.raises(PayloadTruncated):
        writer.receive(it)
    held = len(out.getvalue())
    assert writer.received == held == sum(len(m.chunk.data) for m in messages[1:])
    assert writer.digest.hexdigest() == hashlib.sha256(data[:held]).hexdigest()


def test_sender_refuses_a_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        send_payload(Request, agent_pb2.SubmitTaskHeader(), b"x", 64 << 20)


def test_sender_fails_at_once_for_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        send_payload(Request, agent_pb2.SubmitTaskHeader(), tmp_path / "missing.safetensors")


# ---- safetensors -------------------------------------------------------------------


def sample_weights() -> dict[str, np.ndarray]:
    return {
        "layer.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "layer.bias": np.array([1.5, -2.0, 0.25], dtype=np.float64),
        "steps": np.array([7], dtype=np.int64),
    }


def test_tensors_round_trip_through_bytes_and_files(tmp_path):
    weights = sample_weights()
    loaded = load_bytes(dump_bytes(weights))
    assert set(loaded) == set(weights)
    for name, value in weights.items():
        assert loaded[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded[name], value)

    path = tmp_path / "model.safetensors"
    save_file(weights, path, metadata={RESULT_KIND_KEY: "difference"})
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left
    np.testing.assert_array_equal(load_file(path)["layer.weight"], weights["layer.weight"])
    specs, metadata = describe_file(path)
    assert specs == {
        "layer.weight": TensorSpec("F32", (3, 4)),
        "layer.bias": TensorSpec("F64", (3,)),
        "steps": TensorSpec("I64", (1,)),
    }
    assert metadata == {RESULT_KIND_KEY: "difference"}


def test_non_contiguous_arrays_are_stored():
    view = np.arange(16, dtype=np.float32).reshape(4, 4)[:, ::2]
    np.testing.assert_array_equal(load_bytes(dump_bytes({"v": view}))["v"], view)


@pytest.mark.parametrize(
    "data",
    [b"", b"not safetensors at all", dump_bytes({"w": np.ones(8, np.float32)})[:-4]],
    ids=["empty", "garbage", "truncated"],
)
def test_malformed_safetensors_are_refused(tmp_path, data):
    with pytest.raises(TensorFormatError, match="upload: not valid safetensors"):
        load_bytes(data, source="upload")
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(TensorFormatError, match="bad.safetensors: not valid safetensors"):
        describe_file(path)
    with pytest.raises(TensorFormatError, match="not valid safetensors"):
        load_file(path)


def test_padded_safetensors_are_refused(tmp_path):
    path = tmp_path / "padded.safetensors"
    path.write_bytes(dump_bytes({"w": np.ones(8, np.float32)}) + b"\0\0")
    with pytest.raises(TensorFormatError, match="padded.safetensors"):
        describe_file(path)


def test_what_cannot_be_stored_is_named():
    with pytest.raises(TensorFormatError, match="'w' is a list"):
        dump_bytes({"w": [1.0, 2.0]})
    with pytest.raises(TensorFormatError, match="cannot store"):
        dump_bytes({"w": np.array(["text"])})

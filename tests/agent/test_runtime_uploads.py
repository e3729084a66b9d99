"""Uploads kept for resuming, on their own: keys, offsets, take-overs, verification, disk bounds."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from flare_provider.wire import agent_pb2
from flare_provider.wire.chunks import PayloadError, send_payload
from site_agent.errors import InvalidTaskError
from site_agent.runtime.upload_staging import (
    KeptUploadCorrupt,
    PartialUploads,
    UploadConflict,
    UploadInterrupted,
    UploadKey,
)

PAYLOAD = os.urandom(10_000)
KEY = UploadKey("task-1", len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest())


def chunks(data: bytes = PAYLOAD, offset: int = 0, upto: int | None = None) -> list:
    """The chunk and end messages of ``data`` from ``offset``; ``upto`` cuts the stream after that many bytes."""
    header = agent_pb2.SubmitTaskHeader(task_id=KEY.task_id)
    messages = list(send_payload(agent_pb2.SubmitTaskRequest, header, data, 1000, offset=offset))[1:]
    if upto is not None:
        messages = [m for m in messages if m.WhichOneof("part") == "chunk" and m.chunk.offset < upto]
    return messages


@pytest.fixture
def uploads(tmp_path) -> PartialUploads:
    return PartialUploads(tmp_path / "incoming")


def test_a_key_names_a_valid_task_and_digest():
    for task_id, sha in (("../escape", KEY.digest), (".hidden", KEY.digest), ("t", "ABC"), ("t", KEY.digest.upper())):
        with pytest.raises(InvalidTaskError):
            UploadKey(task_id, 1, sha)
    assert UploadKey.from_file_name(KEY.file_name) == KEY
    assert UploadKey.from_file_name(".upload-nonsense") is None


def test_a_cut_stream_is_kept_and_the_next_one_sends_only_the_rest(uploads):
    with pytest.raises(UploadInterrupted, match="after 4000 of 10000 bytes"):
        uploads.receive(KEY, 0, chunks(upto=4000), "weights")
    assert uploads.offset(KEY) == 4000
    done = uploads.receive(KEY, 4000, chunks(offset=4000), "weights")
    assert done.read_bytes() == PAYLOAD
    assert uploads.offset(KEY) == 0 and list(uploads.directory.glob(".upload-*")) == []


def test_kept_bytes_outlive_the_process_that_received_them(uploads):
    with pytest.raises(UploadInterrupted):
        uploads.receive(KEY, 0, chunks(upto=6000), "weights")
    after_restart = PartialUploads(uploads.directory)  # no digest in memory: the kept bytes are hashed once
    assert after_restart.offset(KEY) == 6000
    assert after_restart.receive(KEY, 6000, chunks(offset=6000), "weights").read_bytes() == PAYLOAD


def test_an_offset_that_does_not_match_what_is_held_is_refused_with_the_count(uploads):
    with pytest.raises(UploadInterrupted):
        uploads.receive(KEY, 0, chunks(upto=3000), "weights")
    for offset in (0, 5000):  # starting over over kept bytes, or past them
        with pytest.raises(UploadConflict) as info:
            uploads.claim(KEY, offset)
        assert info.value.held == 3000
    assert uploads.offset(KEY) == 3000


def test_another_payload_of_the_same_task_never_continues_kept_bytes(uploads):
    with pytest.raises(UploadInterrupted):
        uploads.receive(KEY, 0, chunks(upto=5000), "weights")
    other = os.urandom(len(PAYLOAD))
    other_key = UploadKey(KEY.task_id, len(other), hashlib.sha256(other).hexdigest())
    assert uploads.offset(other_key) == 0
    with pytest.raises(UploadConflict):
        uploads.claim(other_key, 5000)
    assert uploads.receive(other_key, 0, chunks(other), "weights").read_bytes() == other
    uploads.discard_task(KEY.task_id)  # what the agent does once the task exists
    assert list(uploads.directory.glob(".upload-*")) == []


def test_a_newer_stream_takes_over_and_the_older_one_stops_writing(uploads):
    cancelled = []
    older = uploads.claim(KEY, 0, on_superseded=lambda: cancelled.append("older"))
    older.write(PAYLOAD[:2000])
    newer = uploads.claim(KEY, 1000)  # what the agent held when the newer stream asked
    assert cancelled == ["older"]
    with pytest.raises(UploadConflict):
        older.write(PAYLOAD[2000:3000])
    assert older.keep(2000, hashlib.sha256(PAYLOAD[:2000])) is False  # leaves the newer stream's file alone
    newer.write(PAYLOAD[1000:])
    assert newer.complete().read_bytes() == PAYLOAD


def test_a_resumed_upload_that_does_not_verify_is_dropped_whole(uploads):
    with pytest.raises(UploadInterrupted):
        uploads.receive(KEY, 0, chunks(upto=4000), "weights")
    path = uploads.path(KEY)
    path.write_bytes(b"\0" * 4000)  # the kept bytes went bad on disk
    os.utime(path, ns=(0, 10**9))
    with pytest.raises(KeptUploadCorrupt, match="SHA-256 mismatch"):
        uploads.receive(KEY, 4000, chunks(offset=4000), "weights")
    assert not path.exists() and uploads.offset(KEY) == 0


def test_a_malformed_stream_keeps_nothing(uploads):
    messages = chunks()
    messages[1], messages[2] = messages[2], messages[1]
    with pytest.raises(PayloadError, match="out of order"):
        uploads.receive(KEY, 0, messages, "weights")
    assert list(uploads.directory.glob(".upload-*")) == []


def test_stale_and_surplus_kept_uploads_are_dropped(tmp_path):
    uploads = PartialUploads(tmp_path / "incoming", ttl_s=3600, max_kept=2)
    keys = [UploadKey(f"task-{i}", KEY.size, KEY.digest) for i in range(4)]
    for i, key in enumerate(keys):
        with pytest.raises(UploadInterrupted):
            uploads.receive(key, 0, chunks(upto=1000), "weights")
        os.utime(uploads.path(key), (time.time() - 100 + i, time.time() - 100 + i))  # oldest first
    uploads.sweep()
    assert sorted(p.name for p in uploads.directory.glob(".upload-*")) == [keys[2].file_name, keys[3].file_name]
    os.utime(uploads.path(keys[2]), (time.time() - 7200, time.time() - 7200))
    uploads.sweep()
    assert [p.name for p in uploads.directory.glob(".upload-*")] == [keys[3].file_name]

"""The global model is hashed once, as it is written, however many sites it goes to: the
sender frames a file whose digest it knows without hashing it again, and the receiver,
which checks every byte, refuses one that changed after it was hashed."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import xxhash

from flare_provider.client.transfer import payload_identity, save_for_upload
from flare_provider.wire import agent_pb2
from flare_provider.wire.checksums import SHA256, XXH3_128
from flare_provider.wire.chunks import PayloadError, read_header, receive_payload, send_payload
from flare_provider.wire.tensors import load_file


def test_a_file_saved_for_upload_is_not_read_again_to_hash_it(tmp_path):
    path = tmp_path / "global.safetensors"
    weights = {"w": np.arange(1000, dtype=np.float32), "b": np.ones(3, np.float16)}
    save_for_upload(weights, path)
    data = path.read_bytes()
    assert payload_identity(path, XXH3_128) == (len(data), xxhash.xxh3_128_hexdigest(data))
    assert load_file(path)["w"].tolist() == weights["w"].tolist()
    # Bytes changed in place behind the cache's back (same size, inode and time): the digest
    # remembered from the write is what an upload announces, so nothing re-hashed the file.
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(len(data) - 4)
        f.write(b"\xff\xff\xff\xff")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert payload_identity(path, XXH3_128) == (len(data), xxhash.xxh3_128_hexdigest(data))
    # SHA-256, for an agent that speaks nothing else, is hashed from the file once, when asked for.
    changed = path.read_bytes()
    assert payload_identity(path, SHA256) == (len(data), hashlib.sha256(changed).hexdigest())


def _stream(path, sha256):
    size = path.stat().st_size
    header = agent_pb2.SubmitTaskHeader(task_id="t", payload_sha256=sha256)
    return iter(send_payload(agent_pb2.SubmitTaskRequest, header, path, 1 << 10, size, 0, sha256)), size


def test_a_known_digest_is_sent_as_is_and_the_receiver_checks_it(tmp_path):
    path = tmp_path / "payload.bin"
    path.write_bytes(os.urandom(5000))
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    messages, size = _stream(path, sha256)
    header = read_header(messages, "upload")
    received = receive_payload(messages, header.payload_size, tmp_path, size, "upload")
    assert received.read_bytes() == path.read_bytes()

    path.write_bytes(os.urandom(5000))  # changed after it was hashed: same size, other bytes
    messages, size = _stream(path, sha256)
    header = read_header(messages, "upload")
    with pytest.raises(PayloadError, match="SHA-256 mismatch"):
        receive_payload(messages, header.payload_size, tmp_path, size, "upload")

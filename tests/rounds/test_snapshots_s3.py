"""S3 specifics against real moto servers: the endpoint dying (bounded retries, then
SnapshotError, and never a visible half round), multipart streaming of large models,
and no secret in any error."""

from __future__ import annotations

import logging
import threading
import time
import tracemalloc

import numpy as np
import pytest
from boto3.s3.transfer import TransferConfig
from safetensors.numpy import save_file

from flare_provider.files import file_digest
from flare_provider.snapshots import SnapshotCorrupted, SnapshotError, SnapshotStore

FED, RUN = "fed", "manual__2026-05-02T08:30:00+00:00"
MIB = 1 << 20


def weights(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((64, 64), value, np.float32)}


def count_requests(client) -> list[str]:
    """The URL of every HTTP request the client sends from now on, retries included."""
    sent: list[str] = []
    client.meta.events.register("before-send.s3", lambda request, **kw: sent.append(request.url))
    return sent


def test_endpoint_down_retries_a_bounded_number_of_times(start_moto):
    server = start_moto()
    client = server.client()  # one HTTP attempt per call: the store's retries are what we count
    client.create_bucket(Bucket="flare")
    store = SnapshotStore("s3://flare/runs", s3_client=client, attempts=3, backoff_s=0.05)
    store.commit_round(FED, RUN, 0, weights(0), {"round": 0})
    sent = count_requests(client)

    server.kill()  # the S3 endpoint is gone
    started = time.monotonic()
    with pytest.raises(SnapshotError) as caught:
        store.commit_round(FED, RUN, 1, weights(1), {"round": 1})
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "s3://flare/runs/fed/" in message and "round_00001/COMMIT" in message
    assert "after 3 attempts" in message and "Could not connect" in message
    assert len(sent) == 3, sent
    assert elapsed < 10, f"gave up only after {elapsed:.1f} s"

    sent.clear()
    with pytest.raises(SnapshotError, match="cannot list after 3 attempts"):
        store.latest(FED, RUN)  # an unreachable store is an error, never an older round
    assert len(sent) == 3


def test_endpoint_lost_mid_commit_leaves_no_visible_round(moto, bucket, tcp_proxy, caplog):
    proxy = tcp_proxy(moto.port)
    client = moto.client(endpoint=proxy.endpoint)
    store = SnapshotStore(f"s3://{bucket}/p", s3_client=client, attempts=3, backoff_s=0.05)
    store.commit_round(FED, RUN, 0, weights(0), {"round": 0})

    def cut_before_commit_marker(params, **kwargs):
        if params["Key"].endswith("round_00001/COMMIT"):
            proxy.stop()

    client.meta.events.register("before-parameter-build.s3.PutObject", cut_before_commit_marker)
    with caplog.at_level(logging.WARNING, logger="flare_provider.snapshots"):
        with pytest.raises(SnapshotError, match=r"round_00001/COMMIT: cannot write after 3 attempts"):
            store.commit_round(FED, RUN, 1, weights(1), {"round": 1})
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2

    # The server kept what it got: round 1's files, but no commit marker; nobody sees round 1.
    direct = SnapshotStore(f"s3://{bucket}/p", s3_client=moto.client())
    keys = direct.backend.list_keys("")
    assert any(k.endswith("round_00001/model.safetensors") for k in keys)
    assert not any(k.endswith("round_00001/COMMIT") for k in keys)
    assert direct.list_rounds(FED, RUN) == [0]
    assert direct.latest(FED, RUN).round == 0
    # A retried task commits round 1 over the leftovers.
    direct.commit_round(FED, RUN, 1, weights(1), {"round": 1})
    assert direct.latest(FED, RUN).round == 1


def test_a_short_outage_is_ridden_out_by_the_retries(moto, bucket, tcp_proxy, caplog):
    proxy = tcp_proxy(moto.port)
    store = SnapshotStore(f"s3://{bucket}/p", s3_client=moto.client(endpoint=proxy.endpoint), attempts=6, backoff_s=0.2)
    store.commit_round(FED, RUN, 0, weights(0), {"round": 0})
    proxy.stop()
    back = threading.Timer(0.5, tcp_proxy, args=(moto.port, proxy.port))  # the endpoint returns
    back.start()
    try:
        with caplog.at_level(logging.WARNING, logger="flare_provider.snapshots"):
            store.commit_round(FED, RUN, 1, weights(1), {"round": 1})
    finally:
        back.join(timeout=5)
    assert any("retry 1 of 5" in r.getMessage() for r in caplog.records)
    assert store.latest(FED, RUN).round == 1


def test_no_secret_in_errors_or_logs(caplog):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    settings = {
        "endpoint_url": "http://127.0.0.1:9",  # discard port: nothing answers
        "region_name": "us-east-1",
        "aws_access_key_id": "AKIDEXAMPLE",
        "aws_secret_access_key": secret,
        "connect_timeout": 1,
    }
    store = SnapshotStore("s3://flare/x", s3_settings=settings, attempts=2, backoff_s=0.01)
    with caplog.at_level(logging.DEBUG, logger="flare_provider"):
        with pytest.raises(SnapshotError) as caught:
            store.commit_round(FED, RUN, 0, weights(0), {"round": 0})
    assert secret not in str(caught.value) and secret not in repr(caught.value)
    assert secret not in repr(store) and secret not in caplog.text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_large_model_streams_through_multipart_transfers(moto, bucket, tmp_path):
    """A 24 MiB model moves in 5 MiB parts; memory stays well below the model's size."""
    rng = np.random.default_rng(1)
    model = {f"layer{i}": rng.standard_normal(MIB).astype(np.float32) for i in range(6)}
    path = tmp_path / "big.safetensors"
    save_file(model, str(path))
    del model
    size = path.stat().st_size
    client = moto.client(attempts=2)
    parts = []
    client.meta.events.register(
        "before-parameter-build.s3.UploadPart", lambda params, **kw: parts.append(params["PartNumber"])
    )
    # Downloads buffer at most max_io_queue chunks of 256 KiB (boto3's default queue is 25 MiB,
    # small beside a 1 GiB model, but not beside this test's 24 MiB one).
    transfer = TransferConfig(
        multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB, max_concurrency=2, max_io_queue=8
    )
    store = SnapshotStore(f"s3://{bucket}/big", s3_client=client, transfer_config=transfer, tmp_dir=tmp_path / "tmp")

    tracemalloc.start()
    try:
        store.commit_round(FED, RUN, 0, path, {"round": 0})
        upload_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        snapshot = store.latest(FED, RUN)
        copy = store.download_weights(snapshot, tmp_path / "copy.safetensors")
        download_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(set(parts)) == 5  # ceil(24 MiB / 5 MiB)
    assert file_digest(copy) == file_digest(path)
    assert upload_peak < size / 2, f"upload peak {upload_peak / MIB:.1f} MiB for {size / MIB:.0f} MiB"
    assert download_peak < size / 2, f"download peak {download_peak / MIB:.1f} MiB for {size / MIB:.0f} MiB"
    assert list((tmp_path / "tmp").iterdir()) == []  # staging cleaned up


@pytest.mark.parametrize("order", ["in order", "shuffled", "a part written twice"])
def test_downloads_are_hashed_as_they_are_written(order, tmp_path):
    """boto3 writes a multipart download's parts out of order, and again when it retries one."""
    import hashlib
    import random

    from flare_provider.snapshots.s3 import _HashingFile

    data = np.random.default_rng(2).bytes(5 * MIB + 123)
    chunks = [(offset, data[offset : offset + 256 * 1024]) for offset in range(0, len(data), 256 * 1024)]
    if order == "shuffled":
        random.Random(3).shuffle(chunks)
    elif order == "a part written twice":
        chunks += chunks[:3]
    with open(tmp_path / "out", "w+b") as f:
        out = _HashingFile(f)
        for offset, chunk in chunks:
            out.seek(offset)
            out.write(chunk)
        result = out.result()
    assert (tmp_path / "out").read_bytes() == data
    if order == "a part written twice":
        assert result is None  # the caller hashes the file again
    else:
        assert result == (hashlib.sha256(data).hexdigest(), len(data))


def test_a_restore_streams_the_model_into_its_arrays_and_checks_it_on_the_way(moto, bucket, tmp_path):
    """One GET of the model, no staging file; an object swapped after the commit (same size,
    same metadata tag, other bytes) is found out by the SHA-256 taken while it streamed."""
    client = moto.client(attempts=2)
    store = SnapshotStore(f"s3://{bucket}/stream", s3_client=client, tmp_dir=tmp_path / "tmp")
    model = {"a": np.arange(300_000, dtype=np.float32), "b": np.full((7, 3), 2, np.int64)}
    store.commit_round(FED, RUN, 1, model, {"round": 1})
    snapshot = store.latest(FED, RUN)
    sent = count_requests(client)
    restored = store.load_weights(snapshot)
    assert [url for url in sent if url.endswith("model.safetensors")] == [sent[0]] and len(sent) == 1
    assert all(np.array_equal(restored[k], model[k]) and restored[k].dtype == model[k].dtype for k in model)
    assert not (tmp_path / "tmp").exists() or list((tmp_path / "tmp").iterdir()) == []

    key = f"stream/{snapshot.uri.split(f's3://{bucket}/stream/', 1)[1]}/model.safetensors"
    head = client.head_object(Bucket=bucket, Key=key)
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    for damage in (lambda b: b.__setitem__(slice(-4, None), b"\x00\x01\x02\x03"),  # a value changed
                   lambda b: b.__setitem__(slice(0, 8), b"\xff" * 8)):  # the header no longer parses
        swapped = bytearray(body)
        damage(swapped)
        client.put_object(Bucket=bucket, Key=key, Body=bytes(swapped), Metadata=head["Metadata"])
        with pytest.raises(SnapshotCorrupted, match="model.safetensors does not match its SHA-256"):
            store.load_weights(snapshot)

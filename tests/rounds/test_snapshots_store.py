"""The snapshot store on file:// and on S3 (a real moto server over HTTP): commit, latest,
partial and corrupted rounds, final models for warm starts, initial models, bad input."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from flare_provider.snapshots import (
    SnapshotCorrupted,
    SnapshotError,
    SnapshotStore,
    decode_name,
    encode_name,
    load_initial_weights,
)
from flare_provider.snapshots.s3 import parse_s3_uri

FED = "chest-xray"
RUN = "manual__2026-05-01T12:00:00.123456+00:00"


def weights(value: float) -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.full((4, 3, 3, 3), value, np.float32),
        "bn.num_batches_tracked": np.array(int(value), np.int64),
    }


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return SnapshotStore(tmp_path.as_uri() + "/snapshots")
    client = request.getfixturevalue("s3_client")
    bucket = request.getfixturevalue("bucket")
    return SnapshotStore(f"s3://{bucket}/team/flare", s3_client=client, attempts=2, backoff_s=0.01)


def round_key(run: str, number: int, name: str = "") -> str:
    return f"{encode_name(FED)}/{encode_name(run)}/round_{number:05d}" + (f"/{name}" if name else "")


def test_commit_and_latest(store):
    assert store.latest(FED, RUN) is None
    for number in range(3):
        uri = store.commit_round(
            FED, RUN, number, weights(number), {"round": number, "metrics": {"loss": 1.0 / (number + 1)}},
            state_tensors={"m/conv.weight": np.full((4, 3, 3, 3), number, np.float32)},
        )
        assert uri == store.backend.uri(round_key(RUN, number))
    snapshot = store.latest(FED, RUN)
    assert (snapshot.round, snapshot.run, snapshot.federation) == (2, RUN, FED)
    assert snapshot.state == {"round": 2, "metrics": {"loss": 1.0 / 3}}
    assert snapshot.model_uri == uri + "/model.safetensors"
    loaded = store.load_weights(snapshot)
    assert {k: v.tobytes() for k, v in loaded.items()} == {k: v.tobytes() for k, v in weights(2).items()}
    assert store.load_server_state(snapshot)["m/conv.weight"][0, 0, 0, 0] == 2
    assert store.list_rounds(FED, RUN) == [0, 1, 2]
    assert store.list_runs(FED) == [RUN]
    assert store.list_federations() == [FED]
    assert store.get_round(FED, RUN, 1).state["round"] == 1


def test_layout_and_commit_marker(store, tmp_path):
    store.commit_round(FED, RUN, 7, weights(1), {"round": 7})
    keys = store.backend.list_keys("")
    folder = round_key(RUN, 7)
    assert sorted(keys) == [f"{folder}/COMMIT", f"{folder}/model.safetensors", f"{folder}/state.json"]
    assert "%3A" in folder and "%2B" in folder and ":" not in folder and "+" not in folder
    commit = json.loads(store.backend.get_bytes(f"{folder}/COMMIT"))
    assert commit["round"] == 7 and commit["run"] == RUN
    assert set(commit["files"]) == {"model.safetensors", "state.json"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in commit["files"].values())


def test_run_ids_map_to_safe_keys_and_back():
    for name in [RUN, "scheduled__2026-01-01T00:00:00+00:00", "..", ".", "a/b", "ü ñ", "x%41"]:
        segment = encode_name(name)
        assert set(segment) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_%")
        assert decode_name(segment) == name
    assert decode_name("not%2encoded%") is None
    with pytest.raises(ValueError, match="run id must be a non-empty string"):
        encode_name("", "run id")


def test_round_without_commit_is_invisible(store):
    store.commit_round(FED, RUN, 0, weights(0), {"round": 0})
    # A worker died after writing round 1's files but before its commit marker.
    store.backend.put_bytes(round_key(RUN, 1, "model.safetensors"), b"partial")
    store.backend.put_bytes(round_key(RUN, 1, "state.json"), b"{}")
    assert store.list_rounds(FED, RUN) == [0]
    assert store.latest(FED, RUN).round == 0
    with pytest.raises(SnapshotCorrupted, match="round_00001 is not committed"):
        store.get_round(FED, RUN, 1)
    # The retry commits round 1 over the leftovers.
    store.commit_round(FED, RUN, 1, weights(1), {"round": 1})
    assert store.latest(FED, RUN).round == 1


@pytest.mark.parametrize("damage", ["model-bytes", "model-truncated", "model-missing", "state", "commit"])
def test_corrupted_round_falls_back_to_the_previous_one(damage, store, caplog, tmp_path):
    store.commit_round(FED, RUN, 0, weights(0), {"round": 0})
    store.commit_round(FED, RUN, 1, weights(1), {"round": 1})
    model_key = round_key(RUN, 1, "model.safetensors")
    original = store.backend.get_bytes(model_key)
    if damage == "model-bytes":
        store.backend.put_bytes(model_key, original[:-4] + b"\x00\x00\x80\x7f")  # same size, one value now Inf
    elif damage == "model-truncated":
        store.backend.put_bytes(model_key, original[: len(original) // 2])
    elif damage == "model-missing":
        if store.backend.local_path(model_key):
            store.backend.local_path(model_key).unlink()
        else:
            bucket, key = parse_s3_uri(store.backend.uri(model_key))
            store.backend.client.delete_object(Bucket=bucket, Key=key)
    elif damage == "state":
        store.backend.put_bytes(round_key(RUN, 1, "state.json"), b'{"round": 99}\n')
    else:
        store.backend.put_bytes(round_key(RUN, 1, "COMMIT"), b"{not json")
    with caplog.at_level(logging.WARNING, logger="flare_provider.snapshots"):
        snapshot = store.latest(FED, RUN)
    assert snapshot.round == 0
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipping snapshot" in warning and store.backend.uri(round_key(RUN, 1)) in warning
    with pytest.raises(SnapshotCorrupted):
        store.get_round(FED, RUN, 1)


def test_every_round_corrupted_gives_none(store):
    store.commit_round(FED, RUN, 0, weights(0), {"round": 0})
    store.backend.put_bytes(round_key(RUN, 0, "model.safetensors"), b"x")
    assert store.latest(FED, RUN) is None


def test_load_weights_rechecks_the_checksum(store):
    store.commit_round(FED, RUN, 0, weights(0), {"round": 0})
    snapshot = store.latest(FED, RUN)
    model_key = round_key(RUN, 0, "model.safetensors")
    store.backend.put_bytes(model_key, store.backend.get_bytes(model_key)[:-1] + b"\x01")
    with pytest.raises(SnapshotCorrupted, match="model.safetensors does not match its SHA-256"):
        store.load_weights(snapshot)


def _damage_behind_the_tag(store, number: int, tmp_path) -> None:
    """Change round ``number``'s model bytes but not its size or tag, as bit rot would:
    only the SHA-256 can tell."""
    folder, model_key = round_key(RUN, number), round_key(RUN, number, "model.safetensors")
    commit = json.loads(store.backend.get_bytes(f"{folder}/COMMIT"))
    entry = commit["files"]["model.safetensors"]
    original = store.backend.get_bytes(model_key)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(original[:-4] + b"\x00\x00\x80\x7f")
    entry["tag"] = store.backend.put_file(model_key, damaged, entry["sha256"])
    store.backend.put_bytes(f"{folder}/COMMIT", json.dumps(commit).encode())


def test_a_model_damaged_behind_its_tag_fails_at_load_and_restore_takes_the_previous_round(store, caplog, tmp_path):
    store.commit_round(FED, RUN, 0, weights(0), {"round": 0})
    store.commit_round(FED, RUN, 1, weights(1), {"round": 1})
    _damage_behind_the_tag(store, 1, tmp_path)
    snapshot = store.latest(FED, RUN)  # reading a round does not download its model
    assert snapshot.round == 1
    with pytest.raises(SnapshotCorrupted, match="round_00001: model.safetensors does not match its SHA-256"):
        store.load_weights(snapshot)
    with caplog.at_level(logging.WARNING, logger="flare_provider.snapshots"):
        snapshot, loaded = store.restore(FED, RUN)
    assert snapshot.round == 0 and loaded["conv.weight"][0, 0, 0, 0] == 0
    assert "skipping snapshot" in caplog.text and "round_00001: model.safetensors does not match" in caplog.text
    assert store.restore("other", RUN) is None


def test_a_round_committed_without_tags_is_checked_by_its_checksums(store):
    """Rounds committed before tags were recorded, or whose files were replaced or copied."""
    store.commit_round(FED, RUN, 0, weights(0), {"round": 0})
    store.commit_round(FED, RUN, 1, weights(1), {"round": 1})
    for number in (0, 1):
        key = round_key(RUN, number, "COMMIT")
        commit = json.loads(store.backend.get_bytes(key))
        for entry in commit["files"].values():
            entry.pop("tag", None)
        store.backend.put_bytes(key, json.dumps(commit).encode())
    assert store.latest(FED, RUN).round == 1
    model_key = round_key(RUN, 1, "model.safetensors")
    store.backend.put_bytes(model_key, store.backend.get_bytes(model_key)[:-1] + b"\x01")  # same size
    assert store.latest(FED, RUN).round == 0


def test_restore_downloads_the_model_once(moto, bucket):
    client = moto.client()
    requests: list[tuple[str, str]] = []
    client.meta.events.register("before-send.s3", lambda request, **kw: requests.append((request.method, request.url)))
    store = SnapshotStore(f"s3://{bucket}/team", s3_client=client)
    store.commit_round(FED, RUN, 0, weights(0), {"round": 0}, state_tensors={"m": np.ones(3, np.float32)})
    store.commit_round(FED, RUN, 1, weights(1), {"round": 1}, state_tensors={"m": np.ones(3, np.float32)})
    del requests[:]

    def gets(name: str) -> int:
        return sum(method == "GET" and url.split("?")[0].endswith(name) for method, url in requests)

    snapshot = store.latest(FED, RUN)
    assert snapshot.round == 1 and gets("model.safetensors") == gets("server_state.safetensors") == 0
    assert store.load_weights(snapshot)["conv.weight"][0, 0, 0, 0] == 1
    assert store.load_server_state(snapshot)["m"].tolist() == [1, 1, 1]
    assert gets("model.safetensors") == gets("server_state.safetensors") == 1
    del requests[:]
    snapshot, loaded = store.restore(FED, RUN)
    assert snapshot.round == 1 and loaded["bn.num_batches_tracked"] == 1 and gets("model.safetensors") == 1


def test_committed_round_is_never_rewritten(store):
    store.commit_round(FED, RUN, 3, weights(3), {"round": 3})
    with pytest.raises(SnapshotError, match="round_00003 is committed already"):
        store.commit_round(FED, RUN, 3, weights(4), {"round": 3})
    assert store.load_weights(store.latest(FED, RUN))["conv.weight"][0, 0, 0, 0] == 3


def test_commit_from_a_file(store, tmp_path):
    path = tmp_path / "aggregated.safetensors"
    save_file(weights(5), str(path))
    store.commit_round(FED, RUN, 0, path, {"round": 0})
    snapshot = store.latest(FED, RUN)
    assert store.load_weights(snapshot)["bn.num_batches_tracked"] == 5
    copy = store.download_weights(snapshot, tmp_path / "copy.safetensors")
    assert copy.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("args, error, message", [
    ((FED, RUN, 0, weights(0), {"tensor": np.zeros(2)}), ValueError, "must be plain JSON"),
    ((FED, RUN, 0, weights(0), {"loss": float("nan")}), ValueError, "must be plain JSON"),
    ((FED, RUN, 0, weights(0), ["not", "a", "dict"]), ValueError, "must be a dict"),
    ((FED, RUN, -1, weights(0), {}), ValueError, "round must be a non-negative integer"),
    (("", RUN, 0, weights(0), {}), ValueError, "federation must be a non-empty string"),
    ((FED, "", 0, weights(0), {}), ValueError, "run id must be a non-empty string"),
    ((FED, RUN, 0, {"w": [1.0, 2.0]}, {}), ValueError, "weights: tensor 'w' is a list"),
    ((FED, RUN, 0, {}, {}), ValueError, "weights: a model needs at least one tensor"),
])
def test_bad_input_writes_nothing(store, args, error, message):
    with pytest.raises(error, match=message):
        store.commit_round(*args)
    assert store.backend.list_keys("") == []


def test_a_file_that_is_not_safetensors_writes_nothing(store, tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x80\x04pickle, never")
    with pytest.raises(SnapshotError, match="model.bin is not a safetensors file"):
        store.commit_round(FED, RUN, 0, bad, {})
    with pytest.raises(SnapshotError, match="does not exist"):
        store.commit_round(FED, RUN, 0, tmp_path / "missing.safetensors", {})
    assert store.backend.list_keys("") == []


def test_final_models_for_warm_starts(store, caplog):
    assert store.find_final(FED) is None
    first, second, unfinished = "scheduled__2026-04-01T00:00:00+00:00", "scheduled__2026-04-08T00:00:00+00:00", RUN
    for run in (first, second, unfinished):
        for number in range(2):
            store.commit_round(FED, run, number, weights(number + 10 * (run == second)), {"round": number})
    with pytest.raises(SnapshotCorrupted, match="not committed"):
        store.mark_final(FED, first, 5)
    assert store.mark_final(FED, first, 1) == store.backend.uri(round_key(first, 1))
    store.mark_final(FED, second, 0)
    assert store.find_final(FED, unfinished) is None
    assert store.find_final(FED, first).round == 1

    latest_final = store.find_final(FED)
    assert (latest_final.run, latest_final.round) == (second, 0)
    assert store.load_weights(latest_final)["conv.weight"][0, 0, 0, 0] == 10

    # The newest final model is damaged: warm start from the run before, with a warning.
    store.backend.put_bytes(round_key(second, 0, "model.safetensors"), b"damaged")
    with caplog.at_level(logging.WARNING, logger="flare_provider.snapshots"):
        fallback = store.find_final(FED)
    assert (fallback.run, fallback.round) == (first, 1)
    assert any(second in r.getMessage() for r in caplog.records)
    with pytest.raises(SnapshotCorrupted):
        store.find_final(FED, second)
    assert store.list_runs(FED) == sorted([first, second, unfinished])


def test_initial_model_from_path_file_uri_and_s3(tmp_path, s3_client, bucket):
    path = tmp_path / "initial model.safetensors"
    save_file(weights(4), str(path))
    s3_client.upload_file(str(path), bucket, "models/initial.safetensors")
    s3_store = SnapshotStore(f"s3://{bucket}/snapshots", s3_client=s3_client)
    for loaded in (
        load_initial_weights(path),
        load_initial_weights(str(path)),
        load_initial_weights(path.as_uri()),
        load_initial_weights(f"s3://{bucket}/models/initial.safetensors", s3_client=s3_client),
        s3_store.load_initial_weights(f"s3://{bucket}/models/initial.safetensors"),
        s3_store.load_initial_weights(path),
    ):
        assert loaded["conv.weight"].shape == (4, 3, 3, 3) and loaded["bn.num_batches_tracked"] == 4
    with pytest.raises(SnapshotError, match="does not exist"):
        load_initial_weights(f"s3://{bucket}/models/none.safetensors", s3_client=s3_client)
    with pytest.raises(SnapshotError, match="does not exist"):
        load_initial_weights(tmp_path / "none.safetensors")
    (tmp_path / "junk").write_bytes(b"junk" * 10)
    with pytest.raises(SnapshotError, match="is not a safetensors file"):
        load_initial_weights(tmp_path / "junk")
    with pytest.raises(ValueError, match="names an object"):
        load_initial_weights(f"s3://{bucket}", s3_client=s3_client)


@pytest.mark.parametrize("uri, kwargs, message", [
    ("snapshots", {}, "unsupported snapshot store 'snapshots'"),
    ("gs://bucket/x", {}, "unsupported snapshot store"),
    ("file://host/share", {}, "local absolute path"),
    ("s3://", {}, "not an S3 URI"),
    ("s3://bucket/x", {"s3_settings": {"endpoint": "http://x"}}, "unknown S3 settings"),
    ("s3://bucket/x", {"s3_settings": {"region_name": "x"}, "s3_client": object()}, "not both"),
    ("s3://bucket/x", {"attempts": 0, "s3_settings": {"region_name": "us-east-1"}}, "attempts must be"),
])
def test_bad_store_configuration(uri, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SnapshotStore(uri, **kwargs)


def test_a_local_store_moves_the_files_it_wrote_into_place_and_leaves_no_scratch(tmp_path):
    store = SnapshotStore(tmp_path.as_uri() + "/snapshots")
    store.commit_round(FED, RUN, 0, weights(1), {"round": 0}, state_tensors={"m": np.ones(3, np.float32)})
    assert [p.name for p in (tmp_path / "snapshots").iterdir()] == [encode_name(FED)]  # no .flare-staging-* left
    assert store.load_server_state(store.latest(FED, RUN))["m"].tolist() == [1.0, 1.0, 1.0]
    # What a store adopts is renamed in, the very file (same inode), flushed first.
    scratch = store.backend.staging_dir("x")
    ours = scratch / ".ours"
    ours.write_bytes(b"payload")
    inode = ours.stat().st_ino
    store.backend.adopt_file("x/kept.bin", ours, "unused")
    kept = tmp_path / "snapshots" / "x" / "kept.bin"
    assert not ours.exists() and kept.stat().st_ino == inode and kept.read_bytes() == b"payload"
    assert kept.stat().st_mode & 0o777 == 0o644


def test_a_local_store_on_another_file_system_copies_what_it_adopts(tmp_path):
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))  # tmpfs: a rename from tmp_path fails with EXDEV
    try:
        assert os.stat(other).st_dev != os.stat(tmp_path).st_dev
        backend = SnapshotStore(other.as_uri()).backend
        ours = tmp_path / "ours.bin"
        ours.write_bytes(b"payload")
        tag = backend.adopt_file("run/kept.bin", ours, "unused")
        assert (other / "run" / "kept.bin").read_bytes() == b"payload"
        assert backend.stat("run/kept.bin") == (7, tag)
    finally:
        shutil.rmtree(other)


@pytest.mark.parametrize("writeback", [False, True])
def test_a_model_written_in_pieces_is_hashed_as_written(tmp_path, writeback):
    """A model larger than one piece is hashed on a second thread while it is written: the
    digest is the file's, whatever the tensors' sizes against the pieces, and the file is
    the safetensors library's (what a store writes is what any reader loads)."""
    import hashlib

    from safetensors.numpy import load_file

    from flare_provider.snapshots import model_files

    piece = model_files._WRITE_PIECE
    rng = np.random.default_rng(7)
    tensors = {
        "tail": rng.random(3, np.float32),  # smaller than a piece
        "across": rng.random(piece // 4 * 2 + 5, np.float32),  # two pieces and a few bytes
        "exact": rng.integers(0, 9, piece // 8, np.int64),  # exactly one piece
        "strided": rng.random((64, 8193))[:, ::2],  # not contiguous: copied, then written
    }
    path = tmp_path / "model.safetensors"
    sha256, size = model_files.write_hashed(tensors, path, "weights", writeback=writeback)
    assert (sha256, size) == (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size)
    loaded = load_file(path)
    assert sorted(loaded) == sorted(tensors)
    for name, array in tensors.items():
        assert np.array_equal(loaded[name], array), name

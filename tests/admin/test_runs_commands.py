"""``flare runs list``, ``runs download`` and ``model export`` over real snapshot stores:
a local folder and an S3-protocol server started here."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from s3_server import TEST_KEYS, MotoServer  # tests/ is on sys.path

from flare_provider.cli import main as flare
from flare_provider.snapshots import SnapshotStore

FED, RUN = "hospitals", "manual__2026-12-01T00:00:00+00:00"
TB_FILE = "tensorboard/site-1/events.out.tfevents.1.host"  # what the metrics writer keeps under the run


def weights(round_number: int) -> dict[str, np.ndarray]:
    return {"layer.weight": np.full((3, 2), round_number, np.float32), "layer.bias": np.arange(2, dtype=np.float32)}


def fill(store: SnapshotStore) -> None:
    """Three committed rounds and a final marker for RUN, a run of another federation, TensorBoard files."""
    for number in range(3):
        store.commit_round(FED, RUN, number, weights(number), {"round": number, "metrics": {"accuracy": 0.5 + number / 10}})
    store.mark_final(FED, RUN, 2)
    store.commit_round("other", "run-b", 0, weights(7), {"round": 0})
    run_key = store.run_prefix(FED, RUN)
    store.backend.put_bytes(f"{run_key}/{TB_FILE}", b"tensorboard events")


@pytest.fixture
def local_store(tmp_path):
    store = SnapshotStore((tmp_path / "store").as_uri())
    fill(store)
    return store


def files_under(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_runs_list_shows_every_run_with_its_rounds(local_store, capsys):
    assert flare(["runs", "list", "--store", local_store.uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["federation", "run", "rounds", "latest", "final", "committed", "at"]
    (row,) = [line for line in lines if RUN in line]
    assert row.split()[:5] == [FED, RUN, "3", "2", "2"]
    assert any(line.split()[:5] == ["other", "run-b", "1", "0", "-"] for line in lines)
    assert flare(["runs", "list", "--store", local_store.uri, "--federation", "other"]) == 0
    assert RUN not in capsys.readouterr().out


def test_runs_download_copies_the_run_verified(local_store, tmp_path, capsys):
    # A round being written (no COMMIT yet) is left out.
    run_dir = tmp_path / "store" / FED / RUN.replace(":", "%3A").replace("+", "%2B")
    assert run_dir.is_dir()
    (run_dir / "round_00003").mkdir()
    (run_dir / "round_00003" / "model.safetensors").write_bytes(b"half")

    out = tmp_path / "all"
    assert flare(["runs", "download", RUN, "-o", str(out), "--store", local_store.uri]) == 0
    assert "left out, not committed or damaged: round(s) [3]" in capsys.readouterr().out
    got = files_under(out)
    stored = {k: v for k, v in files_under(run_dir).items() if not k.startswith("round_00003")}
    assert got == stored
    assert {"round_00002/model.safetensors", "round_00002/state.json", "round_00002/COMMIT", "FINAL", TB_FILE} <= set(got)

    one = tmp_path / "one"
    assert flare(["runs", "download", f"{FED}/{RUN}", "--round", "1", "-o", str(one), "--store", local_store.uri]) == 0
    assert {k.split("/")[0] for k in files_under(one)} == {"round_00001", "tensorboard", "FINAL"}
    assert flare(["runs", "download", RUN, "--round", "5", "-o", str(tmp_path / "x"), "--store", local_store.uri]) == 2
    assert "has no committed round 5 (committed: [0, 1, 2])" in capsys.readouterr().err


def test_runs_download_refuses_a_changed_model_and_names_bad_input(local_store, tmp_path, capsys):
    run_dir = tmp_path / "store" / FED / RUN.replace(":", "%3A").replace("+", "%2B")
    model = run_dir / "round_00001" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    assert flare(["runs", "download", RUN, "--round", "1", "-o", str(tmp_path / "bad"), "--store", local_store.uri]) == 2
    assert "round_00001: model.safetensors does not match its SHA-256 in COMMIT" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # The whole run: the damaged round is left out, the others come.
    assert flare(["runs", "download", RUN, "-o", str(tmp_path / "rest"), "--store", local_store.uri]) == 0
    assert "warning: round 1 left out" in capsys.readouterr().err
    assert {k.split("/")[0] for k in files_under(tmp_path / "rest")} == {"round_00000", "round_00002", "tensorboard", "FINAL"}
    assert flare(["runs", "download", "nope", "--store", local_store.uri]) == 2
    assert "no run 'nope' in any federation" in capsys.readouterr().err
    assert flare(["runs", "list", "--store", "ftp://x"]) == 2
    assert "unsupported snapshot store" in capsys.readouterr().err


def test_model_export_writes_a_state_dict_pytorch_loads(local_store, tmp_path, capsys):
    import torch

    final = tmp_path / "final.pt"
    assert flare(["model", "export", "--store", local_store.uri, "--run", RUN, "-o", str(final)]) == 0
    loaded = torch.load(final, weights_only=True)
    assert set(loaded) == {"layer.weight", "layer.bias"}
    assert torch.equal(loaded["layer.weight"], torch.full((3, 2), 2.0))
    first = tmp_path / "first.pt"
    model_uri = local_store.get_round(FED, RUN, 0).model_uri
    assert flare(["model", "export", model_uri, "-o", str(first)]) == 0
    assert torch.equal(torch.load(first, weights_only=True)["layer.weight"], torch.zeros(3, 2))
    assert flare(["model", "export", str(tmp_path / "nothing.safetensors"), "-o", str(first)]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_model_export_loads_no_pytorch_until_it_runs():
    code = "import sys; from flare_provider.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_runs_and_model_export_over_s3(tmp_path, capsys, monkeypatch):
    server = MotoServer(tmp_path)
    try:
        server.client().create_bucket(Bucket="models")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_KEYS["aws_access_key_id"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_KEYS["aws_secret_access_key"])
        monkeypatch.setenv("AWS_DEFAULT_REGION", TEST_KEYS["region_name"])
        uri = "s3://models/fl"
        fill(SnapshotStore(uri, s3_settings={"endpoint_url": server.endpoint}))
        s3 = ["--store", uri, "--s3-endpoint", server.endpoint]
        assert flare(["runs", "list", *s3]) == 0
        assert RUN in capsys.readouterr().out
        out = tmp_path / "dl"
        assert flare(["runs", "download", RUN, "-o", str(out), *s3]) == 0
        got = files_under(out)
        assert got[TB_FILE] == b"tensorboard events"
        state = SnapshotStore(uri, s3_settings={"endpoint_url": server.endpoint}).get_round(FED, RUN, 2)
        assert hashlib.sha256(got["round_00002/model.safetensors"]).hexdigest() == state.files["model.safetensors"]["sha256"]
        pt = tmp_path / "m.pt"
        assert flare(["model", "export", f"{state.uri}/model.safetensors", "--s3-endpoint", server.endpoint, "-o", str(pt)]) == 0
        import torch

        assert torch.equal(torch.load(pt, weights_only=True)["layer.weight"], torch.full((3, 2), 2.0))
    finally:
        server.stop()

"""TensorBoard event files as the provider encodes them: the bytes TensorBoard's own protobuf
messages make, framed as TFRecords with the right CRCs, read back by TensorBoard's reader,
and written without importing a TensorBoard package or PyTorch on the Airflow side."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary

from flare_provider.tracking import tensorboard


def test_crc32c_matches_the_published_check_values():
    # RFC 3720 (iSCSI), appendix B.4, and the usual check string
    pieces = [b"123456789", bytes(32), b"\xff" * 32, bytes(range(32)), b""]
    assert tensorboard.crc32c(pieces) == [0xE3069283, 0x8A9136AA, 0x62A8AB43, 0x46DD794E, 0]
    assert tensorboard.crc32c([]) == []


@settings(max_examples=200, deadline=None)
@given(
    tag=st.text(min_size=1, max_size=40),
    value=st.floats(allow_nan=False),  # beyond float32's range too: it becomes infinity
    step=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    wall_time=st.floats(min_value=0, max_value=4e9),
)
def test_an_event_is_the_bytes_tensorboards_own_messages_serialize_to(tag, value, step, wall_time):
    expected = Event(wall_time=wall_time, step=step, summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)]))
    assert tensorboard._event(wall_time, step, scalar=(tag, value)) == expected.SerializeToString()


def test_the_version_event_is_the_bytes_tensorboard_expects():
    expected = Event(wall_time=12.5, file_version="brain.Event:2").SerializeToString()
    assert tensorboard._event(12.5, 0, version=b"brain.Event:2") == expected


def test_tensorboards_reader_reads_back_every_scalar_of_a_file(tmp_path):
    scalars = [("train_loss", 0.5, 0, 100.0), ("train_loss", 0.25, 1, 101.0), ("round/acc", 0.9, 3, None)]
    (tmp_path / "events.out.tfevents.round_00003").write_bytes(tensorboard.event_file_bytes(scalars))
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [(0, 0.5), (1, 0.25)]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("round/acc")] == [(3, 0.9)]
    assert [e.wall_time for e in events.Scalars("train_loss")] == [100.0, 101.0]


def test_each_record_carries_the_masked_crcs_of_its_length_and_its_data():
    data = tensorboard.event_file_bytes([("x", 1.0, 1, 5.0)])
    records = []
    while data:
        length_bytes, length_crc = data[:8], int.from_bytes(data[8:12], "little")
        length = int.from_bytes(length_bytes, "little")
        body, body_crc = data[12 : 12 + length], int.from_bytes(data[12 + length : 16 + length], "little")
        assert [length_crc, body_crc] == tensorboard.masked_crc32c([length_bytes, body])
        records.append(Event.FromString(body))
        data = data[16 + length :]
    assert records[0].file_version == "brain.Event:2"
    assert (records[1].step, records[1].summary.value[0].tag, records[1].summary.value[0].simple_value) == (1, "x", 1.0)


def test_tracking_a_run_loads_neither_pytorch_nor_a_tensorboard_package(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from flare_provider.federation.records import RunSpec
        from flare_provider.snapshots import SnapshotStore
        from flare_provider.tracking import tensorboard
        from flare_provider.tracking.tracker import RunTracking
        spec = RunSpec(federation="f", run_id="r", app_name="a", sites=("s",), num_rounds=1, min_clients=1)
        RunTracking(spec, SnapshotStore({(tmp_path / 'store').as_uri()!r}))
        tensorboard.event_file_bytes([("loss", 1.0, 1, None)])
        print(sorted(m for m in ("torch", "tensorboardX", "tensorboard", "tensorflow") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr

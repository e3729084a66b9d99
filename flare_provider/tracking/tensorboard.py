"""TensorBoard event files of a run: one folder per site and one for the global model.

``tensorboard --logdir <run>/tensorboard`` (a run downloaded from the store, or the store's
folder itself) then shows, by site:

- each streamed metric (``train_loss``, ``train_accuracy``...) on the run-wide step axis
  (see :mod:`.curves`), and
- ``round/<metric>``: the site's round result (``val_accuracy``...) by round;

and under ``global``: ``round/<metric>``, the round's metrics over the sites weighted by
their samples, ``eval/<metric>``, the global model's evaluation where the run scores
rounds, and ``round/num_samples`` and ``round/sites``, by round.

Each round is written as its own event file per folder, named after the round
(``events.out.tfevents.round_00003``), so a retried round replaces its files. The files are
encoded here (:func:`event_file_bytes`), with no TensorBoard package: tensorboardX imports
PyTorch when that is installed, which cost an Airflow task 2-4 s and PyTorch's memory
before its first round.
"""

from __future__ import annotations

import functools
import logging
import math
import struct
import time
from collections.abc import Iterable, Mapping, Sequence

from ..files import safe_name
from ..snapshots.naming import round_folder
from .curves import RoundCurves
from .run_files import RunFiles

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
GLOBAL_RUN = "global"
EVENT_FILE_PREFIX = "events.out.tfevents."

# (tag, value, step, wall time or None)
Scalar = tuple[str, float, int, float | None]


def site_scalars(curves: RoundCurves, site: str) -> list[Scalar]:
    """What one site's event file of the round holds."""
    curve = curves.sites[site]
    scalars: list[Scalar] = [(name, value, p["step"], p["time"]) for p in curve.points for name, value in sorted(p["values"].items())]
    scalars += [(f"round/{name}", value, curves.round, None) for name, value in sorted(curve.metrics.items())]
    return scalars


def global_scalars(number: int, metrics: Mapping[str, float], evaluation: Mapping[str, float] | None,
                   num_samples: int, sites: int) -> list[Scalar]:
    """What the global model's event file of round ``number`` holds."""
    scalars: list[Scalar] = [(f"round/{name}", float(v), number, None) for name, v in sorted(metrics.items())]
    scalars += [(f"eval/{name}", float(v), number, None) for name, v in sorted((evaluation or {}).items())
                if isinstance(v, (int, float)) and not isinstance(v, bool)]
    scalars += [("round/num_samples", float(num_samples), number, None), ("round/sites", float(sites), number, None)]
    return scalars


def event_file_name(run_name: str, number: int) -> str:
    """``tensorboard/<run_name>/events.out.tfevents.round_NNNNN``: TensorBoard reads any file with
    ``tfevents`` in its name, in name order, which is round order here."""
    return f"{TENSORBOARD_DIR}/{run_name}/{EVENT_FILE_PREFIX}{round_folder(number)}"


def site_run_name(site: str) -> str:
    return safe_name(site) if safe_name(site) != GLOBAL_RUN else f"site-{GLOBAL_RUN}"


def write_round(files: RunFiles, number: int, runs: Mapping[str, Iterable[Scalar]]) -> list[str]:
    """Write round ``number``'s event file of each TensorBoard run (folder) in ``runs``; the names written."""
    written = []
    for run_name, scalars in runs.items():
        name = event_file_name(run_name, number)
        # Not fsynced: a power cut may lose the last round's event files, whose values the
        # round's curves file (durable) also holds; a round of 8 sites saves 9 fsyncs.
        files.put_bytes(name, event_file_bytes(scalars), durable=False)
        written.append(name)
    return written


def event_file_bytes(scalars: Iterable[Scalar]) -> bytes:
    """An event file holding ``scalars``: TFRecord-framed ``Event`` messages, the first one the file version.

    Built in memory (these files are small), one record per event: its length
    (little-endian uint64), the masked CRC-32C of the length, the serialized event, and
    the masked CRC-32C of the event.
    """
    events = [_event(time.time(), 0, version=b"brain.Event:2")]
    events += [_event(time.time() if wall_time is None else wall_time, step, scalar=(tag, value))
               for tag, value, step, wall_time in scalars]
    lengths = [struct.pack("<Q", len(data)) for data in events]
    crcs = masked_crc32c(lengths + events)
    records = []
    for length, data, length_crc, data_crc in zip(lengths, events, crcs, crcs[len(events):]):
        records += [length, struct.pack("<I", length_crc), data, struct.pack("<I", data_crc)]
    return b"".join(records)


# ---- the protobuf messages TensorBoard reads, encoded by hand ------------------------------
# tensorboard's event.proto: Event {double wall_time = 1; int64 step = 2; string
# file_version = 3; Summary summary = 5}; summary.proto: Summary {repeated Value value = 1},
# Value {string tag = 1; float simple_value = 2}. Fields holding proto3 defaults are left out.


def _event(wall_time: float, step: int, *, version: bytes = b"", scalar: tuple[str, float] | None = None) -> bytes:
    out = _fixed(b"\x09", "<d", wall_time)  # field 1, 64-bit
    if step:
        out += b"\x10" + _varint(step & 0xFFFFFFFFFFFFFFFF)  # field 2, varint (negative steps as two's complement)
    if version:
        out += _length_delimited(3, version)
    if scalar is not None:
        tag, value = scalar
        # simple_value is one of a oneof: written even when it is 0
        entry = (_length_delimited(1, tag.encode("utf-8")) if tag else b"") + b"\x15" + _float32(value)
        out += _length_delimited(5, _length_delimited(1, entry))
    return out


def _float32(value: float) -> bytes:
    """``value`` as a little-endian float32; beyond its range, infinity of the same sign (as protobuf stores it)."""
    try:
        return struct.pack("<f", value)
    except OverflowError:
        return struct.pack("<f", math.copysign(math.inf, value))


def _fixed(key: bytes, layout: str, value: float) -> bytes:
    """A plain float field; left out when it holds +0.0, as protobuf leaves out defaults (-0.0 is kept)."""
    packed = struct.pack(layout, value)
    return key + packed if any(packed) else b""


def _length_delimited(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@functools.cache
def _crc32c_table():
    import numpy as np

    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):  # Castagnoli's polynomial, reflected
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
    return table


def crc32c(pieces: Sequence[bytes]) -> list[int]:
    """CRC-32C (Castagnoli) of each of ``pieces``, as TFRecord frames use it.

    Byte by byte, as a CRC goes, but for all pieces at once (numpy): a round's file holds
    one short record per point of a curve, and one at a time in Python ran at 4 MB/s.
    """
    import numpy as np

    table = _crc32c_table()
    sizes = np.array([len(p) for p in pieces], dtype=np.int64)
    width = int(sizes.max()) if len(pieces) else 0
    padded = b"".join(bytes(piece).ljust(width, b"\0") for piece in pieces)
    data = np.frombuffer(padded, dtype=np.uint8).reshape(len(pieces), width)
    crc = np.full(len(pieces), 0xFFFFFFFF, dtype=np.uint32)
    for column in range(width):
        step = table[(crc ^ data[:, column]) & 0xFF] ^ (crc >> 8)
        crc = np.where(sizes > column, step, crc)
    return [int(value) ^ 0xFFFFFFFF for value in crc]


def masked_crc32c(pieces: Sequence[bytes]) -> list[int]:
    """TFRecord's masked CRC of each of ``pieces``: the CRC rotated right by 15 bits plus a constant."""
    return [(((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF for crc in crc32c(pieces)]

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
(``events.out.tfevents.round_00003``), so a retried round replaces its files. The writer is
``tensorboardX`` (the ``tracking`` extra); without it the run goes on with a warning and
keeps its curves in the store only.
"""

from __future__ import annotations

import io
import logging
import struct
import time
from collections.abc import Iterable, Mapping

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


def writer_available() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


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

    Built in memory (these files are small): tensorboardX's writers want a file of their
    own and fsync it on close, which cost a scratch folder, a file and an fsync per run
    and round (python -m bench overhead).
    """
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c
    from tensorboardX.summary import scalar

    events = [Event(wall_time=time.time(), file_version="brain.Event:2")]
    events += [Event(wall_time=time.time() if wall_time is None else wall_time, step=step, summary=scalar(tag, value))
               for tag, value, step, wall_time in scalars]
    out = io.BytesIO()
    for event in events:
        data = event.SerializeToString()
        length = struct.pack("<Q", len(data))  # TFRecord: little-endian length, masked CRC-32C of it, data, its CRC
        out.write(length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data)))
    return out.getvalue()

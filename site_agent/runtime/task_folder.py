"""Each task's folder under ``<work_dir>/tasks/<task_id>/`` and how its files are written.

::

    task.json            the task's spec and state (rewritten atomically on each change)
    worker.json          what the worker process needs (written once, before it starts)
    global.safetensors   the global weights the server sent (removed when the task ends)
    result.safetensors   the trainer's weights (or difference), kept until acknowledged
    result.json          num_samples, metrics, kind, the result file's XXH3-128 and size;
                         written last and flushed to disk: a result exists once it does
    worker.log           the worker's stdout and stderr
    scratch/             the trainer's work folder
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flare_provider.files import write_atomic

TASKS_DIR = "tasks"
STAGING_PREFIX = "."


@dataclass(frozen=True)
class TaskPaths:
    """File names inside one task folder."""

    dir: Path

    @property
    def state(self) -> Path:
        return self.dir / "task.json"

    @property
    def worker_input(self) -> Path:
        return self.dir / "worker.json"

    @property
    def global_weights(self) -> Path:
        return self.dir / "global.safetensors"

    @property
    def result_weights(self) -> Path:
        return self.dir / "result.safetensors"

    @property
    def result_info(self) -> Path:
        return self.dir / "result.json"

    @property
    def log(self) -> Path:
        return self.dir / "worker.log"

    @property
    def scratch(self) -> Path:
        return self.dir / "scratch"


def write_json_atomic(path: Path, doc: Any, durable: bool = False) -> None:
    """Write JSON to a temp file beside ``path`` and rename it over ``path``.

    ``durable`` also flushes to disk first (for state that must survive a power cut,
    not only a crash of the process).
    """
    write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), durable=durable)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def weights_record(written: tuple[str, int]) -> dict[str, Any]:
    """What result.json records of result.safetensors: the (XXH3-128 hex, size) its worker wrote."""
    digest, size = written
    return {"xxh3_128": digest, "size": size}


def damaged_result(paths: TaskPaths) -> str | None:
    """Why result.safetensors is not the file its worker recorded in result.json, or None.

    The worker does not flush the result to disk (only result.json): after a power cut the
    file may hold less, or other bytes, than were written. A result.json without the record
    (an older worker's) is taken at its word.
    """
    try:
        record = read_json(paths.result_info).get("weights")
    except (OSError, ValueError, AttributeError) as exc:
        return f"its record result.json is unreadable ({type(exc).__name__})"
    if not record:
        return None
    from flare_provider.wire.checksums import XXH3_128  # the payload modules only where a result is checked
    from flare_provider.wire.chunks import PayloadError, hash_prefix

    try:
        size = paths.result_weights.stat().st_size
        if size != record.get("size"):
            return f"result.safetensors holds {size} bytes, its worker wrote {record.get('size')}"
        digest = hash_prefix(paths.result_weights, size, checksum=XXH3_128).hexdigest()
    except (OSError, PayloadError) as exc:  # PayloadError: it shrank while it was read
        return f"result.safetensors is unreadable ({getattr(exc, 'strerror', None) or exc})"
    if digest != record.get("xxh3_128"):
        return "result.safetensors differs from what its worker wrote (XXH3-128 mismatch)"
    return None

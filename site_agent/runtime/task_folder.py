"""Each task's folder under ``<work_dir>/tasks/<task_id>/`` and how its files are written.

::

    task.json            the task's spec and state (rewritten atomically on each change)
    worker.json          what the worker process needs (written once, before it starts)
    global.safetensors   the global weights the server sent (removed when the task ends)
    result.safetensors   the trainer's weights (or difference), kept until acknowledged
    result.json          num_samples, metrics, kind; written last: a result exists once it does
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

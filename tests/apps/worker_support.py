"""Running the real worker (``python -m site_agent.worker``) on a task folder written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from site_agent.runtime.task_folder import TaskPaths
from site_agent.worker.weights import load_weights, save_weights

REPO = Path(__file__).resolve().parents[2]
GLOBAL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}


def script_app(folder: Path, script: str, script_args: list[str] | None = None, name: str = "scripted") -> Path:
    """An app whose training script is ``script`` (dedented), at custom/train.py."""
    (folder / "custom").mkdir(parents=True, exist_ok=True)
    doc = {"name": name, "script": "custom/train.py", "script_args": script_args or []}
    (folder / "app.yaml").write_text(json.dumps(doc))  # JSON is YAML
    (folder / "custom" / "train.py").write_text(textwrap.dedent(script))
    return folder


@dataclass
class WorkerRun:
    returncode: int
    events: list[dict[str, Any]]
    paths: TaskPaths
    log: str

    @property
    def error(self) -> str | None:
        return next((e["error"] for e in self.events if e["event"] == "failed"), None)

    @property
    def info(self) -> dict[str, Any]:
        return json.loads(self.paths.result_info.read_text())

    def result(self, tensor_format: str = "numpy") -> dict[str, Any]:
        return load_weights(self.paths.result_weights, tensor_format)


def run_worker(task_dir: Path, app_dir: Path, kind: str = "train", weights: dict | None = GLOBAL,
               allow_custom_code: bool = True, data_dir: Path | None = None, config: dict | None = None,
               world_size: int = 1, timeout: float = 120) -> WorkerRun:
    """Write the task folder as the agent does and run the worker on it, following its progress pipe."""
    task_dir.mkdir(parents=True)
    paths = TaskPaths(task_dir)
    data_dir = data_dir or task_dir / "data"
    data_dir.mkdir(exist_ok=True)
    save_weights(paths.global_weights, weights or {})
    job = {"task_id": f"{task_dir.name}-r1", "site": "site-x", "round": 1, "kind": kind, "config": config or {},
           "app_dir": str(app_dir), "allow_custom_code": allow_custom_code, "data_dir": str(data_dir), "gpus": [],
           "privacy": {}, "share_local_model": False, "world_size": world_size}
    paths.worker_input.write_text(json.dumps(job))
    read_fd, write_fd = os.pipe()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    with open(paths.log, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "site_agent.worker", str(task_dir), "--progress-fd", str(write_fd)],
                                stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_fd,), env=env)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        lines = pipe.read().splitlines()  # ends when the worker (and any rank) has closed the pipe
    returncode = proc.wait(timeout)
    return WorkerRun(returncode, [json.loads(line) for line in lines], paths, paths.log.read_text())

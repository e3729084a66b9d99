"""Task records: each task's spec and state, kept in its folder so that they outlive the agent.

A record is rewritten atomically (``task.json``, see :mod:`site_agent.runtime.task_folder`)
on every change of its state, whose ``seq`` then grows and wakes whoever waits on the
task lock. After a restart :meth:`TaskRecords.load` rebuilds every task from its folder:
queued tasks queue again; a task that was running when the agent died is failed, or
succeeded if its worker had committed a result before dying; results stay until the
server acknowledges them.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flare_provider.wire.task_state import FAILED, QUEUED, RUNNING, SUCCEEDED, TASK_KINDS, TaskState

from ..errors import InvalidTaskError, UnknownTaskError
from .metric_series import MetricSeries
from .task_folder import STAGING_PREFIX, TaskPaths, damaged_result, read_json, write_json_atomic

log = logging.getLogger(__name__)

TASK_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")  # \Z: "$" would let a final newline into a folder name
RESTARTED = "agent restarted during the task"


@dataclass
class TaskSpec:
    """What the server asks for."""

    task_id: str  # derived by the server from (run, round, site)
    app_name: str
    app_version: str | None  # None: the latest deployed version
    round: int
    kind: str = "train"  # "train" | "evaluate" | "initialize"
    config: dict = field(default_factory=dict)  # per-round trainer config (JSON-able)
    num_gpus: int | None = None  # None: 1 when the site has GPUs, else 0
    requested_by: str = ""
    num_processes: int | None = None  # ranks of a task on CPU (None: 1); a GPU task runs one rank per GPU


def check_spec(spec: TaskSpec) -> None:
    """Raise :class:`InvalidTaskError` naming the first field of ``spec`` that is malformed."""

    def bad(problem: str) -> InvalidTaskError:
        return InvalidTaskError(f"task {getattr(spec, 'task_id', '?')!r}: {problem}")

    if not isinstance(spec.task_id, str) or not TASK_ID_RE.match(spec.task_id) or spec.task_id.startswith("."):
        raise bad("task_id must be 1-128 letters, digits, '.', '_', ':' or '-', not starting with '.'")
    if not isinstance(spec.app_name, str) or not spec.app_name:
        raise bad("app_name is required")
    if spec.app_version is not None and not isinstance(spec.app_version, str):
        raise bad("app_version must be a version string or None")
    if not _is_count(spec.round):
        raise bad(f"round must be a whole number >= 0, got {spec.round!r}")
    if spec.kind not in TASK_KINDS:
        raise bad(f"kind must be one of {list(TASK_KINDS)}, got {spec.kind!r}")
    if not isinstance(spec.config, dict):
        raise bad("config must be a mapping")
    try:
        json.dumps(spec.config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise bad(f"config must be plain JSON data ({exc})") from None
    if spec.num_gpus is not None and not _is_count(spec.num_gpus):
        raise bad(f"num_gpus must be a whole number >= 0 or None, got {spec.num_gpus!r}")
    if spec.num_processes is not None and not (_is_count(spec.num_processes) and spec.num_processes >= 1):
        raise bad(f"num_processes must be a whole number >= 1 or None, got {spec.num_processes!r}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(eq=False)
class TaskRecord:
    """One task as the agent holds it: what was asked, where it stands, its folder, its worker."""

    spec: TaskSpec
    state: TaskState
    paths: TaskPaths
    num_gpus: int
    pid: int | None = None
    reaped: bool = True  # no live (or zombie) worker we could signal
    stop_reason: str | None = None  # set when the agent itself ends the worker
    reported_error: str | None = None
    monitor: threading.Thread | None = None
    series: MetricSeries | None = None  # the task's training curve as it is thinned (its points are in state.history)


# How a restart ends a worker that outlived the agent: (process id, task folder).
EndLeftoverWorker = Callable[[int | None, Path], None]


class TaskRecords:
    """Every task of this site by id, each mirrored in its folder under ``root``.

    Not locked itself: callers hold ``lock``, the condition every change notifies.
    """

    def __init__(self, root: Path, lock: threading.Condition, site_name: str):
        self.root = root
        self.site_name = site_name
        self._lock = lock
        self._by_id: dict[str, TaskRecord] = {}

    def find(self, task_id: str) -> TaskRecord | None:
        return self._by_id.get(task_id)

    def get(self, task_id: str) -> TaskRecord:
        task = self._by_id.get(task_id)
        if task is None:
            raise UnknownTaskError(f"no task {task_id!r} is known at site {self.site_name!r}")
        return task

    def all(self) -> list[TaskRecord]:
        """Every task, oldest first."""
        return sorted(self._by_id.values(), key=lambda t: t.state.created_at)

    def create(self, spec: TaskSpec, app_name: str, app_version: str, num_gpus: int, weights_file: Path) -> TaskRecord:
        """A new queued task, its folder complete on disk; the weights file is moved into it.

        The folder is filled under a hidden name and renamed into place, so a crash
        meanwhile leaves no half-made task (:meth:`load` removes the remains).
        """
        now = time.time()
        state = TaskState(
            task_id=spec.task_id, app_name=app_name, app_version=app_version, round=spec.round,
            kind=spec.kind, status=QUEUED, progress=0.0, metrics={}, error=None, gpus=[],
            num_samples=0, result_available=False, seq=1, created_at=now, started_at=None, finished_at=None,
        )
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}new-", dir=self.root))
        try:
            shutil.move(str(weights_file), TaskPaths(staging).global_weights)
            task = TaskRecord(spec=copy.deepcopy(spec), state=state, paths=TaskPaths(staging), num_gpus=num_gpus)
            self.persist(task, durable=True)
            target = self.root / spec.task_id
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        task.paths = TaskPaths(target)
        self._by_id[spec.task_id] = task
        return task

    def persist(self, task: TaskRecord, durable: bool = False) -> None:
        doc = {"spec": asdict(task.spec), "state": task.state.to_dict(), "num_gpus": task.num_gpus, "pid": task.pid}
        write_json_atomic(task.paths.state, doc, durable=durable)

    def change(self, task: TaskRecord, durable: bool = False, **fields) -> None:
        """Set fields of the task's state, bump its ``seq``, write it and wake the waiters."""
        for name, value in fields.items():
            setattr(task.state, name, value)
        task.state.seq += 1
        self.persist(task, durable)
        self._lock.notify_all()

    def record_result(self, task: TaskRecord) -> None:
        """The task succeeded with the result its worker committed (failed if that record is unreadable)."""
        try:
            info = read_json(task.paths.result_info)
            kind, num_samples, metrics = info["kind"], int(info["num_samples"]), dict(info["metrics"])
            summary_json = json.dumps(info["summary"], sort_keys=True) if "summary" in info else ""  # a describe task's
        except (OSError, ValueError, TypeError, KeyError) as exc:
            self.change(task, durable=True, status=FAILED, finished_at=time.time(),
                        error=f"the worker's result record is unreadable ({type(exc).__name__})")
            return
        has_weights = kind != "metrics" and task.paths.result_weights.is_file()
        self.change(task, durable=True, status=SUCCEEDED, progress=1.0, metrics=metrics,
                    num_samples=num_samples, result_available=has_weights, finished_at=time.time(), error=None,
                    summary_json=summary_json)

    # ---- after a restart --------------------------------------------------------

    def load(self, end_leftover_worker: EndLeftoverWorker) -> list[TaskRecord]:
        """Read every task folder back; returns the queued tasks, oldest first."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(STAGING_PREFIX):  # a submit cut short
                shutil.rmtree(folder, ignore_errors=True)
            elif folder.is_dir():
                task = self._recover(folder, end_leftover_worker)
                self._by_id[task.state.task_id] = task
        return sorted((t for t in self._by_id.values() if t.state.status == QUEUED), key=lambda t: t.state.created_at)

    def _recover(self, folder: Path, end_leftover_worker: EndLeftoverWorker) -> TaskRecord:
        paths = TaskPaths(folder)
        try:
            doc = read_json(paths.state)
            task = TaskRecord(
                TaskSpec(**doc["spec"]), TaskState.from_dict(doc["state"]), paths, int(doc["num_gpus"]), doc.get("pid")
            )
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("task folder %s has unreadable state: %s", folder, exc)
            now = time.time()
            state = TaskState(
                task_id=folder.name, app_name="", app_version="", round=0, kind="train", status=FAILED,
                progress=0.0, metrics={}, error=f"task state unreadable after an agent restart ({type(exc).__name__})",
                gpus=[], num_samples=0, result_available=False, seq=1, created_at=now, started_at=None, finished_at=now,
            )
            task = TaskRecord(TaskSpec(folder.name, "", None, 0), state, paths, 0)
            self.persist(task, durable=True)
            return task
        if task.state.status == RUNNING:
            end_leftover_worker(task.pid, folder)
            task.pid = None
            if paths.result_info.is_file():  # the worker committed its result before the agent died
                self.record_result(task)
            else:
                self.change(task, durable=True, status=FAILED, error=RESTARTED, finished_at=time.time())
            paths.global_weights.unlink(missing_ok=True)
        if task.state.result_available:
            if not paths.result_weights.is_file():  # acknowledged: deleted before the state said so
                self.change(task, durable=True, result_available=False)
            elif (problem := damaged_result(paths)) is not None:  # the machine went down before it reached the disk
                log.error("task %s: its result is damaged and will not be served: %s", task.state.task_id, problem)
                paths.result_weights.unlink(missing_ok=True)
                self.change(task, durable=True, status=FAILED, result_available=False,
                            error=f"the result was lost when the site's machine went down ({problem}); "
                                  "the task must run again")
        return task

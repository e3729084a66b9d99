"""Training tasks: durable, idempotent, each run in its own child process.

The :class:`TaskManager` is what the RPC service calls. It ties together three parts,
all under one lock (a condition that wakes watchers on every change):

- :mod:`.task_records`: one folder per task under ``<work_dir>/tasks``, recovered after
  a restart; results stay there until the server acknowledges them;
- :mod:`.scheduler`: the queue, until a task's GPUs (or a CPU slot) are free;
- :mod:`.processes`: each task's worker process, its signals and its progress.

Uploads of global weights cut short wait in :mod:`.upload_staging` (``uploads``) until
they are resumed, their task is created, or they grow stale.
"""

from __future__ import annotations

import copy
import logging
import shutil
import threading
import time
from pathlib import Path

from flare_provider.wire.task_state import ABORTED, FAILED, QUEUED, RUNNING, SUCCEEDED, TaskState

from ..consent import check_task, judge
from ..errors import InvalidTaskError, NoResultError, TaskRejected, UnknownAppError
from ..site_settings import SiteSettings
from ..worker.weights import WeightsError, tensor_layout
from .app_store import AppStore
from .processes import (
    ABORT_GRACE_S,
    ABORT_REQUESTED,
    WorkerProcesses,
    WorkerStartError,
    describe_exit,
    end_leftover_worker,
)
from .scheduler import Scheduler
from .task_folder import TASKS_DIR
from .task_records import TaskRecord, TaskRecords, TaskSpec, check_spec
from .upload_staging import PartialUploads

log = logging.getLogger(__name__)

STOPPED = "agent stopped during the task"
INCOMING_DIR = "incoming"


class TaskManager:
    """Runs the server's tasks on this site's CPUs and GPUs. Thread-safe."""

    def __init__(self, settings: SiteSettings, apps: AppStore, site_name: str):
        self.settings = settings
        self.apps = apps
        self.site_name = site_name
        self.root = Path(settings.work_dir) / TASKS_DIR
        self._lock = threading.Condition()
        self._records = TaskRecords(self.root, self._lock, site_name)
        self._scheduler = Scheduler(settings.gpus, settings.max_concurrent_cpu_tasks, site_name)
        self._processes = WorkerProcesses(settings, site_name, self._records, self._lock, on_exit=self._finish)
        self.uploads = PartialUploads(Path(settings.work_dir) / INCOMING_DIR)
        self._started = False
        self._closed = False

    # ---- life cycle -------------------------------------------------------------

    def start(self) -> None:
        """Load every task from disk (see :meth:`TaskRecords.load`) and start scheduling."""
        with self._lock:
            if self._started:
                return
            for task in self._records.load(end_leftover_worker):
                self._scheduler.add(task)
            self.uploads.sweep()  # uploads kept from before the restart wait to be resumed, unless stale
            self._started = True
            self._schedule()

    def close(self) -> None:
        """Stop: end running workers (recorded failed, "agent stopped"); queued tasks stay queued."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = [t for t in self._records.all() if t.state.status == RUNNING]
            for task in running:
                self._processes.terminate(task, STOPPED)
        self._processes.shut_down(running)

    @property
    def incoming_dir(self) -> Path:
        """A folder on the same file system as the tasks: weights received here move in without a copy."""
        path = Path(self.settings.work_dir) / INCOMING_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---- the interface ----------------------------------------------------------

    def submit(self, spec: TaskSpec, weights_file: Path) -> tuple[TaskState, bool]:
        """Queue a task; returns (state, created).

        A task id seen before returns that task unchanged and never trains again (the
        weights file is then left where it is). Otherwise the weights file (safetensors)
        is moved into the task's folder.
        """
        check_spec(spec)
        with self._lock:
            if not self._started or self._closed:
                raise TaskRejected("the agent is not accepting tasks (starting up or shutting down)")
            existing = self._records.find(spec.task_id)
            if existing is not None:
                self.uploads.discard_task(spec.task_id)
                return copy.deepcopy(existing.state), False
            app = self.apps.get(spec.app_name, spec.app_version)
            check_task(self.settings, app, self.site_name)  # the site's consent to its code, its requirements met
            num_gpus = self._scheduler.gpus_needed(spec)
            self._scheduler.ranks_needed(spec, num_gpus)
            try:
                tensor_layout(Path(weights_file))
            except WeightsError as exc:
                raise InvalidTaskError(f"task {spec.task_id}: global weights: {exc}") from None
            task = self._records.create(spec, app.name, app.version, num_gpus, weights_file)
            self.uploads.discard_task(spec.task_id)  # other payloads once sent for this task will not be needed
            self._scheduler.add(task)
            log.info("task %s queued (app %s, round %d, %s)", spec.task_id, app.name, spec.round, spec.kind)
            self._lock.notify_all()
            self._schedule()
            return copy.deepcopy(task.state), True

    def exists(self, task_id: str) -> bool:
        """Whether ``task_id`` is known, without waiting for the lock: a task is never forgotten,
        and one dict lookup sees it or not, so an upload's progress probe never queues behind a task's start."""
        return self._records.find(task_id) is not None

    def get(self, task_id: str) -> TaskState:
        with self._lock:
            return copy.deepcopy(self._records.get(task_id).state)

    def wait(self, task_id: str, after_seq: int, timeout: float) -> TaskState:
        """The task's state once its ``seq`` is above ``after_seq``, or as it is after ``timeout`` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            task = self._records.get(task_id)
            while task.state.seq <= after_seq:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
            return copy.deepcopy(task.state)

    def result_file(self, task_id: str) -> tuple[Path, TaskState]:
        """The result weights (safetensors) of a finished training task; :class:`NoResultError` otherwise."""
        with self._lock:
            task = self._records.get(task_id)
            state = task.state
            if state.status in (QUEUED, RUNNING):
                raise NoResultError(f"task {task_id} is {state.status}; it has no result yet")
            if state.status != SUCCEEDED:
                raise NoResultError(f"task {task_id} {state.status}: {state.error}")
            if state.kind in ("evaluate", "describe"):
                raise NoResultError(f"task {task_id} is an {state.kind} task: its metrics are in its state, it has no weights")
            if not state.result_available or not task.paths.result_weights.is_file():
                raise NoResultError(f"the result of task {task_id} was already acknowledged and deleted")
            return task.paths.result_weights, copy.deepcopy(state)

    def acknowledge(self, task_id: str) -> None:
        """The server has the result: delete it (idempotent)."""
        with self._lock:
            task = self._records.get(task_id)
            if task.state.status in (QUEUED, RUNNING):
                raise NoResultError(f"task {task_id} is {task.state.status}; there is nothing to acknowledge yet")
            for path in (task.paths.result_weights, task.paths.global_weights):
                path.unlink(missing_ok=True)
            shutil.rmtree(task.paths.scratch, ignore_errors=True)
            if task.state.result_available:
                self._records.change(task, durable=True, result_available=False)

    def abort(self, task_id: str) -> TaskState:
        """Stop a queued or running task (its whole process group); a finished task is left as it is."""
        with self._lock:
            task = self._records.get(task_id)
            if task.state.status == QUEUED:
                self._scheduler.remove(task)
                task.paths.global_weights.unlink(missing_ok=True)
                self._records.change(task, durable=True, status=ABORTED, error="aborted before it started",
                                     finished_at=time.time())
            elif task.state.status == RUNNING:
                self._processes.abort(task)
                deadline = time.monotonic() + ABORT_GRACE_S + 10
                while task.state.status == RUNNING and time.monotonic() < deadline:
                    self._lock.wait(deadline - time.monotonic())
            return copy.deepcopy(task.state)

    def list(self) -> list[TaskState]:
        with self._lock:
            return [copy.deepcopy(t.state) for t in self._records.all()]

    def worker_pid(self, task_id: str) -> int | None:
        """The process id of a running task's worker (its process group id too), else None."""
        with self._lock:
            task = self._records.get(task_id)
            return task.pid if task.state.status == RUNNING else None

    # ---- starting and ending tasks (under the lock) -----------------------------

    def _schedule(self) -> None:
        if self._started and not self._closed:
            self._scheduler.start_ready(self._start)

    def _start(self, task: TaskRecord, gpus: list[int]) -> None:
        task.state.gpus = gpus
        try:
            app = self.apps.get(task.state.app_name, task.state.app_version)
        except (UnknownAppError, OSError) as exc:
            self._start_failed(task, f"cannot prepare the task: {exc}")
            return
        consent = judge(self.settings.custom_code, app, self.site_name)  # rejected at the site since it queued?
        if not consent.runnable:
            self._start_failed(task, consent.reason)
            return
        try:
            self._processes.start(task, app.path, gpus)
        except WorkerStartError as exc:
            self._start_failed(task, str(exc))

    def _start_failed(self, task: TaskRecord, error: str) -> None:
        self._scheduler.release(task)
        task.paths.global_weights.unlink(missing_ok=True)
        self._records.change(task, durable=True, status=FAILED, error=error, finished_at=time.time(), gpus=[])

    def _finish(self, task: TaskRecord, returncode: int) -> None:
        """Record how a task's worker ended (it has been reaped), then start what was waiting for its slot."""
        self._scheduler.release(task)
        task.paths.global_weights.unlink(missing_ok=True)
        committed = returncode == 0 and task.paths.result_info.is_file()
        now = time.time()
        if task.stop_reason == ABORT_REQUESTED:
            task.paths.result_weights.unlink(missing_ok=True)
            task.paths.result_info.unlink(missing_ok=True)
            self._records.change(task, durable=True, status=ABORTED, error="aborted on request", finished_at=now)
        elif committed:
            self._records.record_result(task)
        elif task.stop_reason is not None:
            self._records.change(task, durable=True, status=FAILED, error=task.stop_reason, finished_at=now)
        else:
            error = task.reported_error or describe_exit(returncode)
            self._records.change(task, durable=True, status=FAILED, error=error, finished_at=now)
        log.info("task %s %s%s", task.spec.task_id, task.state.status, f": {task.state.error}" if task.state.error else "")
        self._schedule()

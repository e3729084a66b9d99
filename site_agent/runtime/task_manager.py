"""Training tasks: durable, idempotent, each run in its own child process.

The :class:`TaskManager` keeps one folder per task under ``<work_dir>/tasks`` (see
:mod:`site_agent.task_store`), queues tasks until their GPUs (or a CPU slot) are free,
runs each in a worker process of its own (forked by :mod:`site_agent.launcher`, in its
own process group), follows its progress over a pipe, and records the outcome. Results
stay on disk until the server acknowledges them, across agent restarts.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import select
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .apps import AppStore
from .errors import (
    InvalidTaskError,
    NoResultError,
    TaskRejected,
    UnknownAppError,
    UnknownTaskError,
)
from .gpus import GpuPool
from .launcher import LauncherError, WorkerLauncher
from .settings import SiteSettings
from .task_store import (
    STAGING_PREFIX,
    TASKS_DIR,
    TaskPaths,
    read_json,
    write_json_atomic,
)
from .weights import WeightsError, tensor_layout

log = logging.getLogger(__name__)

TASK_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
KINDS = ("train", "evaluate", "initialize")  # initialize: the app builds a starting model
TERMINAL = ("succeeded", "failed", "aborted")
ABORT_GRACE_S = 2.0  # between SIGTERM and SIGKILL
_STRAY_WAIT_S = 2.0  # how long the pipe may stay open after the worker itself exited
_RESTARTED = "agent restarted during the task"
_STOPPED = "agent stopped during the task"
_HIDDEN_FROM_WORKERS = ("FLARE_KIT_PASSWORD",)
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


@dataclass
class TaskSpec:
    """What the server asks for."""

    task_id: str  # derived by the server from (run, round, site)
    app_name: str
    app_version: str | None  # None: the latest deployed version
    round: int
    kind: str = "train"  # "train" | "evaluate"
    config: dict = field(default_factory=dict)  # per-round trainer config (JSON-able)
    num_gpus: int | None = None  # None: 1 when the site has GPUs, else 0
    requested_by: str = ""


@dataclass
class TaskState:
    """Where a task stands; ``seq`` grows on every change."""

    task_id: str
    app_name: str
    app_version: str
    round: int
    kind: str
    status: str  # "queued" | "running" | "succeeded" | "failed" | "aborted"
    progress: float
    metrics: dict[str, float]
    error: str | None
    gpus: list[int]
    num_samples: int
    result_available: bool  # result on disk, not yet acknowledged
    seq: int
    created_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(eq=False)
class _Task:
    spec: TaskSpec
    state: TaskState
    paths: TaskPaths
    num_gpus: int
    pid: int | None = None
    reaped: bool = True  # no live (or zombie) worker we could signal
    stop_reason: str | None = None  # set when the agent itself ends the worker
    reported_error: str | None = None
    monitor: threading.Thread | None = None


class TaskManager:
    """Runs the server's tasks on this site's CPUs and GPUs. Thread-safe."""

    def __init__(self, settings: SiteSettings, apps: AppStore, site_name: str):
        self.settings = settings
        self.apps = apps
        self.site_name = site_name
        self.root = Path(settings.work_dir) / TASKS_DIR
        self._cond = threading.Condition()
        self._tasks: dict[str, _Task] = {}
        self._queue: list[_Task] = []
        self._gpus = GpuPool(settings.gpus)
        self._running_cpu = 0
        # CPU-only settings: nothing the launcher preloads may touch a GPU before the fork.
        self._launcher = WorkerLauncher(self._worker_env([]), Path(settings.work_dir), settings.preload_modules)
        self._started = False
        self._closed = False

    # ---- life cycle -------------------------------------------------------------

    def start(self) -> None:
        """Load every task from disk and start scheduling.

        Queued tasks queue again; a task that was running when the agent died is
        failed (or succeeded, if its worker had committed a result before dying);
        finished results stay until acknowledged.
        """
        with self._cond:
            if self._started:
                return
            self.root.mkdir(parents=True, exist_ok=True)
            for folder in sorted(self.root.iterdir()):
                if folder.name.startswith(STAGING_PREFIX):  # a submit cut short
                    shutil.rmtree(folder, ignore_errors=True)
                elif folder.is_dir():
                    task = self._recover(folder)
                    self._tasks[task.state.task_id] = task
            self._queue = sorted(
                (t for t in self._tasks.values() if t.state.status == "queued"), key=lambda t: t.state.created_at
            )
            self._started = True
            self._schedule()

    def close(self) -> None:
        """Stop: end running workers (recorded failed, "agent stopped"); queued tasks stay queued."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            running = [t for t in self._tasks.values() if t.state.status == "running"]
            for task in running:
                task.stop_reason = task.stop_reason or _STOPPED
                self._signal(task, signal.SIGTERM)
        deadline = time.monotonic() + ABORT_GRACE_S
        for task in running:
            if task.monitor is not None:
                task.monitor.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            for task in running:
                self._signal(task, signal.SIGKILL)
        for task in running:
            if task.monitor is not None:
                task.monitor.join(10)
        self._launcher.close()

    @property
    def incoming_dir(self) -> Path:
        """A folder on the same file system as the tasks: weights received here move in without a copy."""
        path = Path(self.settings.work_dir) / "incoming"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---- the interface ----------------------------------------------------------

    def submit(self, spec: TaskSpec, weights_file: Path) -> tuple[TaskState, bool]:
        """Queue a task; returns (state, created).

        A task id seen before returns that task unchanged and never trains again (the
        weights file is then left where it is). Otherwise the weights file (safetensors)
        is moved into the task's folder.
        """
        self._check_spec(spec)
        with self._cond:
            if not self._started or self._closed:
                raise TaskRejected("the agent is not accepting tasks (starting up or shutting down)")
            existing = self._tasks.get(spec.task_id)
            if existing is not None:
                return copy.deepcopy(existing.state), False
            app = self.apps.get(spec.app_name, spec.app_version)
            if app.has_custom_code and not self.settings.allow_custom_code:
                raise TaskRejected(
                    f"app {app.name!r} brings custom code and site {self.site_name!r} does not allow it "
                    "(allow_custom_code in local/site.yaml)"
                )
            num_gpus = self._gpus_needed(spec)
            try:
                tensor_layout(Path(weights_file))
            except WeightsError as exc:
                raise InvalidTaskError(f"task {spec.task_id}: global weights: {exc}") from None

            now = time.time()
            state = TaskState(
                task_id=spec.task_id, app_name=app.name, app_version=app.version, round=spec.round,
                kind=spec.kind, status="queued", progress=0.0, metrics={}, error=None, gpus=[],
                num_samples=0, result_available=False, seq=1, created_at=now, started_at=None, finished_at=None,
            )
            staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}new-", dir=self.root))
            try:
                shutil.move(str(weights_file), TaskPaths(staging).global_weights)
                task = _Task(spec=copy.deepcopy(spec), state=state, paths=TaskPaths(staging), num_gpus=num_gpus)
                self._persist(task, durable=True)
                target = self.root / spec.task_id
                staging.rename(target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            task.paths = TaskPaths(target)
            self._tasks[spec.task_id] = task
            self._queue.append(task)
            log.info("task %s queued (app %s, round %d, %s)", spec.task_id, app.name, spec.round, spec.kind)
            self._cond.notify_all()
            self._schedule()
            return copy.deepcopy(task.state), True

    def get(self, task_id: str) -> TaskState:
        with self._cond:
            return copy.deepcopy(self._task(task_id).state)

    def wait(self, task_id: str, after_seq: int, timeout: float) -> TaskState:
        """The task's state once its ``seq`` is above ``after_seq``, or as it is after ``timeout`` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            task = self._task(task_id)
            while task.state.seq <= after_seq:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return copy.deepcopy(task.state)

    def result_file(self, task_id: str) -> tuple[Path, TaskState]:
        """The result weights (safetensors) of a finished training task; :class:`NoResultError` otherwise."""
        with self._cond:
            task = self._task(task_id)
            state = task.state
            if state.status in ("queued", "running"):
                raise NoResultError(f"task {task_id} is {state.status}; it has no result yet")
            if state.status != "succeeded":
                raise NoResultError(f"task {task_id} {state.status}: {state.error}")
            if state.kind == "evaluate":
                raise NoResultError(f"task {task_id} is an {state.kind} task: its metrics are in its state, it has no weights")
            if not state.result_available or not task.paths.result_weights.is_file():
                raise NoResultError(f"the result of task {task_id} was already acknowledged and deleted")
            return task.paths.result_weights, copy.deepcopy(state)

    def acknowledge(self, task_id: str) -> None:
        """The server has the result: delete it (idempotent)."""
        with self._cond:
            task = self._task(task_id)
            if task.state.status in ("queued", "running"):
                raise NoResultError(f"task {task_id} is {task.state.status}; there is nothing to acknowledge yet")
            for path in (task.paths.result_weights, task.paths.global_weights):
                path.unlink(missing_ok=True)
            shutil.rmtree(task.paths.scratch, ignore_errors=True)
            if task.state.result_available:
                self._change(task, durable=True, result_available=False)

    def abort(self, task_id: str) -> TaskState:
        """Stop a queued or running task (its whole process group); a finished task is left as it is."""
        with self._cond:
            task = self._task(task_id)
            if task.state.status == "queued":
                self._queue.remove(task)
                task.paths.global_weights.unlink(missing_ok=True)
                self._change(task, durable=True, status="aborted", error="aborted before it started",
                             finished_at=time.time())
            elif task.state.status == "running":
                if task.stop_reason is None:
                    task.stop_reason = "aborted"
                    self._signal(task, signal.SIGTERM)
                    escalation = threading.Timer(ABORT_GRACE_S, self._escalate, args=(task,))
                    escalation.daemon = True
                    escalation.start()
                deadline = time.monotonic() + ABORT_GRACE_S + 10
                while task.state.status == "running" and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
            return copy.deepcopy(task.state)

    def list(self) -> list[TaskState]:
        with self._cond:
            return [copy.deepcopy(t.state) for t in sorted(self._tasks.values(), key=lambda t: t.state.created_at)]

    def worker_pid(self, task_id: str) -> int | None:
        """The process id of a running task's worker (its process group id too), else None."""
        with self._cond:
            task = self._task(task_id)
            return task.pid if task.state.status == "running" else None

    # ---- checks -----------------------------------------------------------------

    @staticmethod
    def _check_spec(spec: TaskSpec) -> None:
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
        if spec.kind not in KINDS:
            raise bad(f"kind must be one of {list(KINDS)}, got {spec.kind!r}")
        if not isinstance(spec.config, dict):
            raise bad("config must be a mapping")
        try:
            json.dumps(spec.config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise bad(f"config must be plain JSON data ({exc})") from None
        if spec.num_gpus is not None and not _is_count(spec.num_gpus):
            raise bad(f"num_gpus must be a whole number >= 0 or None, got {spec.num_gpus!r}")

    def _gpus_needed(self, spec: TaskSpec) -> int:
        site_gpus = len(self.settings.gpus)
        wanted = (1 if site_gpus else 0) if spec.num_gpus is None else spec.num_gpus
        if wanted > site_gpus:
            raise TaskRejected(f"task {spec.task_id} asks for {wanted} GPU(s); site {self.site_name!r} has {site_gpus}")
        return wanted

    def _task(self, task_id: str) -> _Task:
        task = self._tasks.get(task_id)
        if task is None:
            raise UnknownTaskError(f"no task {task_id!r} is known at site {self.site_name!r}")
        return task

    # ---- state (all under self._cond) -------------------------------------------

    def _persist(self, task: _Task, durable: bool = False) -> None:
        doc = {"spec": asdict(task.spec), "state": asdict(task.state), "num_gpus": task.num_gpus, "pid": task.pid}
        write_json_atomic(task.paths.state, doc, durable=durable)

    def _change(self, task: _Task, durable: bool = False, **fields) -> None:
        for name, value in fields.items():
            setattr(task.state, name, value)
        task.state.seq += 1
        self._persist(task, durable)
        self._cond.notify_all()

    def _recover(self, folder: Path) -> _Task:
        paths = TaskPaths(folder)
        try:
            doc = read_json(paths.state)
            task = _Task(TaskSpec(**doc["spec"]), TaskState(**doc["state"]), paths, int(doc["num_gpus"]), doc.get("pid"))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("task folder %s has unreadable state: %s", folder, exc)
            now = time.time()
            state = TaskState(
                task_id=folder.name, app_name="", app_version="", round=0, kind="train", status="failed",
                progress=0.0, metrics={}, error=f"task state unreadable after an agent restart ({type(exc).__name__})",
                gpus=[], num_samples=0, result_available=False, seq=1, created_at=now, started_at=None, finished_at=now,
            )
            task = _Task(TaskSpec(folder.name, "", None, 0), state, paths, 0)
            self._persist(task, durable=True)
            return task
        if task.state.status == "running":
            _kill_leftover_worker(task.pid, folder)
            task.pid = None
            if paths.result_info.is_file():  # the worker committed its result before the agent died
                self._record_result(task)
            else:
                self._change(task, durable=True, status="failed", error=_RESTARTED, finished_at=time.time())
            paths.global_weights.unlink(missing_ok=True)
        elif task.state.result_available and not paths.result_weights.is_file():
            self._change(task, durable=True, result_available=False)
        return task

    def _record_result(self, task: _Task) -> None:
        try:
            info = read_json(task.paths.result_info)
            kind, num_samples, metrics = info["kind"], int(info["num_samples"]), dict(info["metrics"])
        except (OSError, ValueError, TypeError, KeyError) as exc:
            self._change(task, durable=True, status="failed", finished_at=time.time(),
                         error=f"the worker's result record is unreadable ({type(exc).__name__})")
            return
        has_weights = kind != "metrics" and task.paths.result_weights.is_file()
        self._change(task, durable=True, status="succeeded", progress=1.0, metrics=metrics,
                     num_samples=num_samples, result_available=has_weights, finished_at=time.time(), error=None)

    # ---- scheduling and workers (under self._cond) ------------------------------

    def _schedule(self) -> None:
        """Start queued tasks whose resources are free, in order. GPU tasks never overtake each other."""
        if not self._started or self._closed:
            return
        gpu_blocked = False
        for task in list(self._queue):
            if task.num_gpus == 0:
                if self._running_cpu >= self.settings.max_concurrent_cpu_tasks:
                    continue
                self._running_cpu += 1
                gpus: list[int] = []
            else:
                if gpu_blocked:
                    continue
                taken = self._gpus.take(task.num_gpus)
                if taken is None:
                    gpu_blocked = True  # keep order: a later GPU task must not starve this one
                    continue
                gpus = taken
            self._queue.remove(task)
            self._launch(task, gpus)

    def _release(self, task: _Task) -> None:
        if task.num_gpus == 0:
            self._running_cpu -= 1
        else:
            self._gpus.release(task.state.gpus)

    def _launch(self, task: _Task, gpus: list[int]) -> None:
        task.state.gpus = gpus
        try:
            app = self.apps.get(task.state.app_name, task.state.app_version)
            self._write_worker_input(task, app.path, gpus)
            read_fd, write_fd = os.pipe()
        except (UnknownAppError, OSError) as exc:
            self._launch_failed(task, f"cannot prepare the task: {exc}")
            return
        try:
            with open(task.paths.log, "ab") as log_file:
                pid = self._launcher.start_worker(
                    task.paths.dir, task.paths.scratch, self._worker_env(gpus), log_file.fileno(), write_fd
                )
        except (LauncherError, OSError) as exc:
            os.close(read_fd)
            self._launch_failed(task, f"cannot start the worker process: {exc}")
            return
        finally:
            os.close(write_fd)
        task.pid, task.reaped = pid, False
        self._change(task, durable=True, status="running", started_at=time.time(), gpus=gpus)
        task.monitor = threading.Thread(
            target=self._monitor, args=(task, pid, read_fd), name=f"task-{task.spec.task_id}", daemon=True
        )
        task.monitor.start()
        log.info("task %s running in process %d on %s", task.spec.task_id, pid, f"GPU {gpus}" if gpus else "CPU")

    def _launch_failed(self, task: _Task, error: str) -> None:
        self._release(task)
        task.paths.global_weights.unlink(missing_ok=True)
        self._change(task, durable=True, status="failed", error=error, finished_at=time.time(), gpus=[])

    def _write_worker_input(self, task: _Task, app_dir: Path, gpus: list[int]) -> None:
        job = {
            "task_id": task.spec.task_id,
            "site": self.site_name,
            "round": task.spec.round,
            "kind": task.spec.kind,
            "config": task.spec.config,
            "app_dir": str(app_dir),
            "allow_custom_code": self.settings.allow_custom_code,
            "data_dir": str(self.settings.data_dir),
            "gpus": gpus,
        }
        write_json_atomic(task.paths.worker_input, job)
        task.paths.scratch.mkdir(exist_ok=True)

    def _worker_env(self, gpus: list[int]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _HIDDEN_FROM_WORKERS}
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))  # empty: a CPU task sees no GPU
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # deployed apps stay exactly as signed
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        if not gpus:  # CPU tasks share the cores rather than each taking all of them
            threads = str(max(1, (os.cpu_count() or 1) // self.settings.max_concurrent_cpu_tasks))
            for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env.setdefault(name, threads)
        return env

    def _signal(self, task: _Task, sig: int) -> None:
        """Signal the worker's process group, unless the worker was already reaped (its id may be reused)."""
        if task.pid is None or task.reaped:
            return
        try:
            os.killpg(task.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _escalate(self, task: _Task) -> None:
        with self._cond:
            self._signal(task, signal.SIGKILL)

    # ---- following a worker (its own thread) ------------------------------------

    def _monitor(self, task: _Task, pid: int, fd: int) -> None:
        buffer = b""
        exited_at = None
        try:
            while True:
                ready, _, _ = select.select([fd], [], [], 0.2)
                if ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    *lines, buffer = (buffer + chunk).split(b"\n")
                    for line in lines:
                        self._on_message(task, line)
                    if len(buffer) > 1 << 20:  # not our protocol; drop rather than grow
                        buffer = b""
                elif self._launcher.has_exited(pid):
                    if exited_at is None:
                        exited_at = time.monotonic()
                        with self._cond:
                            self._signal(task, signal.SIGKILL)  # strays of the group that still hold the pipe
                    elif time.monotonic() - exited_at > _STRAY_WAIT_S:
                        break
        finally:
            os.close(fd)
            returncode = self._launcher.wait(pid)  # exited, not yet reaped
            with self._cond:
                self._signal(task, signal.SIGKILL)  # whatever is left in its process group
                self._launcher.reap(pid)
                task.reaped = True
                self._finish(task, returncode)

    def _on_message(self, task: _Task, line: bytes) -> None:
        try:
            message = json.loads(line)
            event = message["event"]
        except (ValueError, KeyError, TypeError):
            return
        with self._cond:
            if event == "progress":
                metrics = message.get("metrics") or {}
                clean = {str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
                progress = message.get("progress")
                progress = float(progress) if isinstance(progress, (int, float)) else task.state.progress
                self._change(task, progress=min(1.0, max(0.0, progress)), metrics={**task.state.metrics, **clean})
            elif event == "failed":
                task.reported_error = str(message.get("error"))[:2000]

    def _finish(self, task: _Task, returncode: int) -> None:
        self._release(task)
        task.paths.global_weights.unlink(missing_ok=True)
        committed = returncode == 0 and task.paths.result_info.is_file()
        now = time.time()
        if task.stop_reason == "aborted":
            task.paths.result_weights.unlink(missing_ok=True)
            task.paths.result_info.unlink(missing_ok=True)
            self._change(task, durable=True, status="aborted", error="aborted on request", finished_at=now)
        elif committed:
            self._record_result(task)
        elif task.stop_reason is not None:
            self._change(task, durable=True, status="failed", error=task.stop_reason, finished_at=now)
        else:
            error = task.reported_error or _describe_exit(returncode)
            self._change(task, durable=True, status="failed", error=error, finished_at=now)
        log.info("task %s %s%s", task.spec.task_id, task.state.status, f": {task.state.error}" if task.state.error else "")
        self._schedule()


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"the worker process was killed by {name}{hint}"
    return f"the worker process exited with status {returncode} without a result (see worker.log)"


def _kill_leftover_worker(pid: int | None, task_dir: Path) -> None:
    """End a worker that outlived the agent before it, if that process is really ours."""
    if pid and pid in worker_processes(task_dir):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def worker_processes(task_dir: Path) -> list[int]:
    """The live processes working in a task's folder (its worker and their children), from /proc."""
    task_dir = Path(task_dir).resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone, or not ours to look at
        if state != "Z" and cwd.is_relative_to(task_dir):
            found.append(int(entry.name))
    return found

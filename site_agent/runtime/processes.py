"""The worker processes of running tasks: starting them, signalling them, following them.

Each task runs in a worker forked by the warm launcher (:mod:`site_agent.runtime.launcher`)
as the leader of a process group of its own, so that ending a task ends whatever its
trainer started too. The worker reports progress and failures as JSON lines on a pipe,
which one thread per task reads; once the worker has exited, whatever is left of its
group is killed and the outcome handed to the task manager.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flare_provider.wire.task_state import RUNNING

from ..site_settings import SiteSettings
from .launcher import LauncherError, WorkerLauncher
from .metric_series import MetricSeries
from .scheduler import task_world_size
from .task_folder import write_json_atomic
from .task_records import TaskRecord, TaskRecords

log = logging.getLogger(__name__)

ABORT_GRACE_S = 2.0  # between SIGTERM and SIGKILL
ABORT_REQUESTED = "aborted"  # the stop reason of a task aborted on request
_STRAY_WAIT_S = 2.0  # how long the pipe may stay open after the worker itself exited
_HIDDEN_FROM_WORKERS = ("FLARE_KIT_PASSWORD",)
# The folder holding the site_agent package: workers import it from there, installed or not.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


class WorkerStartError(Exception):
    """A task's worker could not be started; the message says why and becomes the task's error."""


class WorkerProcesses:
    """Starts and follows the workers of one site's tasks.

    Every method expects the caller to hold ``lock`` (the task lock), except
    :meth:`shut_down`; the threads following the workers take it themselves.
    """

    def __init__(
        self,
        settings: SiteSettings,
        site_name: str,
        records: TaskRecords,
        lock: threading.Condition,
        on_exit: Callable[[TaskRecord, int], None],
    ):
        self.settings = settings
        self.site_name = site_name
        self._records = records
        self._lock = lock
        self._on_exit = on_exit  # called under the lock with the worker's return code, once it is reaped
        # CPU-only settings: nothing the launcher preloads may touch a GPU before the fork.
        self._launcher = WorkerLauncher(self._env([]), Path(settings.work_dir), settings.preload_modules,
                                       settings.python)

    def start(self, task: TaskRecord, app_dir: Path, gpus: list[int]) -> None:
        """Start the task's worker on ``gpus`` and mark the task running; :class:`WorkerStartError` if it cannot start."""
        try:
            self._write_input(task, app_dir, gpus)
            read_fd, write_fd = os.pipe()
        except OSError as exc:
            raise WorkerStartError(f"cannot prepare the task: {exc}") from None
        try:
            with open(task.paths.log, "ab") as log_file:
                pid = self._launcher.start_worker(
                    task.paths.dir, task.paths.scratch, self._env(gpus), log_file.fileno(), write_fd
                )
        except (LauncherError, OSError) as exc:
            os.close(read_fd)
            raise WorkerStartError(f"cannot start the worker process: {exc}") from None
        finally:
            os.close(write_fd)
        task.pid, task.reaped = pid, False
        self._records.change(task, durable=True, status=RUNNING, started_at=time.time(), gpus=gpus)
        task.monitor = threading.Thread(
            target=self._follow, args=(task, pid, read_fd), name=f"task-{task.spec.task_id}", daemon=True
        )
        task.monitor.start()
        world_size = task_world_size(gpus, task.spec.num_processes)
        log.info("task %s running in process %d on %s%s", task.spec.task_id, pid, f"GPU {gpus}" if gpus else "CPU",
                 f" as {world_size} ranks" if world_size > 1 else "")

    def signal(self, task: TaskRecord, sig: int) -> None:
        """Signal the worker's process group, unless the worker was already reaped (its id may be reused)."""
        if task.pid is None or task.reaped:
            return
        try:
            os.killpg(task.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def abort(self, task: TaskRecord) -> None:
        """Ask the worker to stop (SIGTERM), and kill its group if it has not within the grace period."""
        if task.stop_reason is not None:
            return  # already being stopped
        task.stop_reason = ABORT_REQUESTED
        self.signal(task, signal.SIGTERM)
        escalation = threading.Timer(ABORT_GRACE_S, self._escalate, args=(task,))
        escalation.daemon = True
        escalation.start()

    def terminate(self, task: TaskRecord, reason: str) -> None:
        """Ask the worker to stop (SIGTERM) because the agent stops; ``reason`` becomes the task's error."""
        task.stop_reason = task.stop_reason or reason
        self.signal(task, signal.SIGTERM)

    def shut_down(self, terminated: list[TaskRecord]) -> None:
        """After :meth:`terminate`: give those workers the grace period, kill what is left, stop the launcher.

        Called without the lock: the threads following the workers need it to record their ends.
        """
        deadline = time.monotonic() + ABORT_GRACE_S
        for task in terminated:
            if task.monitor is not None:
                task.monitor.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for task in terminated:
                self.signal(task, signal.SIGKILL)
        for task in terminated:
            if task.monitor is not None:
                task.monitor.join(10)
        self._launcher.close()

    def _escalate(self, task: TaskRecord) -> None:
        with self._lock:
            self.signal(task, signal.SIGKILL)

    # ---- preparing a worker -----------------------------------------------------

    def _write_input(self, task: TaskRecord, app_dir: Path, gpus: list[int]) -> None:
        job = {
            "task_id": task.spec.task_id,
            "site": self.site_name,
            "round": task.spec.round,
            "kind": task.spec.kind,
            "config": task.spec.config,
            "app_dir": str(app_dir),
            # each version's custom code was judged against site.yaml before its worker starts (site_agent.consent)
            "allow_custom_code": self.settings.custom_code.may_run_any,
            "data_dir": str(self.settings.data_dir),
            "gpus": gpus,
            # ranks of PyTorch distributed (site_agent.worker.ranks): one per GPU, or num_processes on CPU
            "world_size": task_world_size(gpus, task.spec.num_processes),
            "privacy": self.settings.privacy.to_dict(),  # the site's filters, the floor of any request
            "share_local_model": self.settings.share_local_model,  # site.yaml: may others evaluate its model
        }
        write_json_atomic(task.paths.worker_input, job)
        task.paths.scratch.mkdir(exist_ok=True)

    def _env(self, gpus: list[int]) -> dict[str, str]:
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

    # ---- following a worker (its own thread) ------------------------------------

    def _follow(self, task: TaskRecord, pid: int, fd: int) -> None:
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
                        with self._lock:
                            self.signal(task, signal.SIGKILL)  # strays of the group that still hold the pipe
                    elif time.monotonic() - exited_at > _STRAY_WAIT_S:
                        break
        finally:
            os.close(fd)
            returncode = self._launcher.wait(pid)  # exited, not yet reaped
            with self._lock:
                self.signal(task, signal.SIGKILL)  # whatever is left in its process group
                self._launcher.reap(pid)
                task.reaped = True
                self._on_exit(task, returncode)

    def _on_message(self, task: TaskRecord, line: bytes) -> None:
        try:
            message = json.loads(line)
            event = message["event"]
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            if event == "progress":
                metrics = message.get("metrics") or {}
                clean = {str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
                clean = self.settings.metrics.allowed(clean)  # site.yaml: which metrics may leave
                progress = message.get("progress")
                progress = float(progress) if isinstance(progress, (int, float)) else task.state.progress
                step = message.get("step")
                if task.series is None:
                    task.series = MetricSeries(self.settings.metrics)
                if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
                    task.series.add(step, clean, time.time())
                self._records.change(task, progress=min(1.0, max(0.0, progress)), metrics={**task.state.metrics, **clean},
                                     history=task.series.points())
            elif event == "failed":
                task.reported_error = str(message.get("error"))[:2000]


def describe_exit(returncode: int) -> str:
    """Why a worker that left no result ended, for the task's error."""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"the worker process was killed by {name}{hint}"
    return f"the worker process exited with status {returncode} without a result (see worker.log)"


def end_leftover_worker(pid: int | None, task_dir: Path) -> None:
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

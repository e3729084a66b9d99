"""Simulated sites: each one the site agent's own runtime on a local folder, called in-process.

A simulated site is a real :class:`~site_agent.runtime.task_manager.TaskManager` (task
folders, the warm worker launcher, ``python -m site_agent.worker``: the same trainer
loading, the same privacy filters, the same result files) with its own data and work
folder. What is left out is only the way there: no gRPC, no TLS, no relay, no signed
bundle. :class:`SimulatedClient` answers the calls the run engine's
:class:`~flare_provider.federation.communicator.SiteCommunicator` makes of an
:class:`~flare_provider.client.AgentClient`, so the engine runs unchanged.

All sites share one :class:`TaskSlots`: at most ``threads`` tasks run at once on this
machine, in the order they were submitted, whatever the number of sites.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from site_agent.errors import InvalidTaskError, NoResultError, UnknownAppError
from site_agent.runtime.app_store import AppInfo
from site_agent.runtime.task_manager import TaskManager
from site_agent.runtime.task_records import TaskSpec, check_spec
from site_agent.service.agent_service import status_of  # the agent's one mapping of its errors to gRPC codes
from site_agent.site_settings import SiteSettings
from site_agent.worker.weights import WeightsError, tensor_layout

from ..client import AgentError
from ..wire.task_state import ABORTED, FAILED, QUEUED, TaskState

_WATCH_POLL_S = 1.0


class SimulatedApp:
    """The one app of a simulation, "deployed" at every site: a folder holding its bundle's files."""

    def __init__(self, info: AppInfo):
        self.info = info

    def get(self, name: str, version: str | None = None) -> AppInfo:
        if name != self.info.name or version not in (None, self.info.version):
            raise UnknownAppError(f"no app {name!r}{f' version {version[:12]}' if version else ''} in this simulation "
                                  f"(it runs {self.info.name!r} version {self.info.version[:12]})")
        return self.info


class TaskSlots:
    """At most ``size`` tasks of all simulated sites run at once; the others wait their turn in order."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"at least one task must be able to run, got {size} slots")
        self.size = size
        self._free = size
        self._waiting: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()

    def request(self, start: Callable[[], None]) -> None:
        """Call ``start`` once a slot is free (maybe now, in this thread); it must :meth:`release` the slot later."""
        with self._lock:
            self._waiting.append(start)
        self._dispatch()

    def cancel(self, start: Callable[[], None]) -> bool:
        """Withdraw a request that has not started; False when it has."""
        with self._lock:
            try:
                self._waiting.remove(start)
            except ValueError:
                return False
            return True

    def release(self) -> None:
        with self._lock:
            self._free += 1
        self._dispatch()

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                if not self._free or not self._waiting:
                    return
                self._free -= 1
                start = self._waiting.popleft()
            start()  # outside the lock: starting a worker takes a while, and may release at once


class SimulatedSite:
    """One site: its task manager, and the tasks accepted here that wait for a slot of the machine.

    A waiting task is this object's until it gets a slot; from then on it is the task
    manager's, whose states carry on from the waiting one's (``seq`` 1, queued).
    """

    def __init__(self, name: str, settings: SiteSettings, app: SimulatedApp, slots: TaskSlots):
        self.name = name
        self.settings = settings
        self.app = app
        self.slots = slots
        self.manager = TaskManager(settings, app, name)
        self.manager.start()
        self._lock = threading.Condition()
        self._waiting: dict[str, tuple[TaskState, TaskSpec, Path, Callable[[], None]]] = {}
        self._ended: dict[str, TaskState] = {}  # ended before they reached the manager (aborted, refused)

    def close(self) -> None:
        with self._lock:
            for _, _, _, start in self._waiting.values():
                self.slots.cancel(start)
            self._waiting.clear()
            self._lock.notify_all()
        self.manager.close()

    # ---- the calls of a client --------------------------------------------------------

    def submit(self, spec: TaskSpec, weights: Path) -> tuple[TaskState, bool]:
        """Accept a task (checked as the agent checks it); it runs when a slot is free."""
        check_spec(spec)
        with self._lock:
            known = self._known(spec.task_id)
            if known is not None:
                return known, False
            if self.manager.exists(spec.task_id):  # a repeated submit re-attaches, as at an agent
                return self.manager.get(spec.task_id), False
            app = self.app.get(spec.app_name, spec.app_version)
            try:
                tensor_layout(weights)
            except WeightsError as exc:
                raise InvalidTaskError(f"task {spec.task_id}: global weights: {exc}") from None
            # The manager moves its weights file into the task folder: give it a copy of its own.
            incoming = self.manager.incoming_dir / f"{spec.task_id}.safetensors"
            shutil.copyfile(weights, incoming)
            state = TaskState(
                task_id=spec.task_id, app_name=app.name, app_version=app.version, round=spec.round, kind=spec.kind,
                status=QUEUED, progress=0.0, metrics={}, error=None, gpus=[], num_samples=0, result_available=False,
                seq=1, created_at=time.time(), started_at=None, finished_at=None,
            )

            def start() -> None:
                self._start(spec.task_id)

            self._waiting[spec.task_id] = (state, spec, incoming, start)
        self.slots.request(start)
        return copy.deepcopy(state), True

    def get(self, task_id: str) -> TaskState:
        with self._lock:
            known = self._known(task_id)
        return known if known is not None else self.manager.get(task_id)

    def wait(self, task_id: str, after_seq: int, timeout: float) -> TaskState:
        """The task's state once its ``seq`` is above ``after_seq``, or as it is after ``timeout`` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            while True:
                known = self._known(task_id)
                remaining = deadline - time.monotonic()
                if known is None:
                    break  # the manager's now
                if known.seq > after_seq or known.terminal or remaining <= 0:
                    return known
                self._lock.wait(remaining)
        return self.manager.wait(task_id, after_seq, max(0.0, deadline - time.monotonic()))

    def result_file(self, task_id: str) -> tuple[Path, TaskState]:
        with self._lock:
            known = self._known(task_id)
        if known is not None:
            raise NoResultError(f"task {task_id} is {known.status}; it has no result")
        return self.manager.result_file(task_id)

    def acknowledge(self, task_id: str) -> None:
        with self._lock:
            known = self._known(task_id)
        if known is None:
            self.manager.acknowledge(task_id)
        elif not known.terminal:
            raise NoResultError(f"task {task_id} is {known.status}; there is nothing to acknowledge yet")

    def abort(self, task_id: str) -> TaskState:
        with self._lock:
            if task_id in self._waiting:
                state, _, incoming, start = self._waiting.pop(task_id)
                self.slots.cancel(start)
                incoming.unlink(missing_ok=True)
                self._end(state, ABORTED, "aborted before it started")
                return copy.deepcopy(state)
            known = self._known(task_id)
        return known if known is not None else self.manager.abort(task_id)

    # ---- a task's turn ------------------------------------------------------------------

    def _known(self, task_id: str) -> TaskState | None:
        """A task that is not the manager's (under the lock), else None."""
        if task_id in self._waiting:
            return copy.deepcopy(self._waiting[task_id][0])
        if task_id in self._ended:
            return copy.deepcopy(self._ended[task_id])
        return None

    def _end(self, state: TaskState, status: str, error: str) -> None:
        state.status, state.error, state.finished_at, state.seq = status, error, time.time(), state.seq + 1
        self._ended[state.task_id] = state
        self._lock.notify_all()

    def _start(self, task_id: str) -> None:
        """A slot is ours: hand the task to the manager, and give the slot back once it ends."""
        started = False
        with self._lock:
            entry = self._waiting.get(task_id)
            if entry is not None:  # else aborted meanwhile, or the site closed
                state, spec, incoming, _ = entry
                try:
                    # Under the lock: until the manager has it, the task must be found here.
                    self.manager.submit(spec, incoming)
                    started = True
                except Exception as exc:  # refused now, though it was checked when it came: it fails, as at an agent
                    incoming.unlink(missing_ok=True)
                    self._end(state, FAILED, f"the site could not start the task: {exc}")
                del self._waiting[task_id]
                self._lock.notify_all()
        if started:
            threading.Thread(target=self._release_when_ended, args=(task_id,), name=f"slot-{task_id}", daemon=True).start()
        else:
            self.slots.release()  # outside this site's lock: it may start another site's task

    def _release_when_ended(self, task_id: str) -> None:
        try:
            state = self.manager.get(task_id)
            while not state.terminal:
                state = self.manager.wait(task_id, state.seq, 30.0)
        finally:
            self.slots.release()


class SimulatedClient:
    """What the run engine calls on an :class:`~flare_provider.client.AgentClient`, answered by a simulated site.

    Errors are the agent's own, turned into :class:`~flare_provider.client.AgentError` with
    the gRPC code the agent would have sent, so the engine decides exactly as it would.
    """

    def __init__(self, site: SimulatedSite):
        self.site = site
        self.name = site.name

    def close(self) -> None:
        pass

    def __enter__(self) -> "SimulatedClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            code, details = status_of(exc)
            raise AgentError(self.name, method, code, details) from exc

    def submit_task(
        self,
        task_id: str,
        app_name: str,
        weights: str | os.PathLike,
        round: int,
        *,
        kind: str = "train",
        config: dict[str, Any] | None = None,
        app_version: str | None = None,
        num_gpus: int | None = None,
        num_processes: int | None = None,
    ) -> tuple[TaskState, bool]:
        # The config crosses as JSON, as on the wire: the trainer sees lists where the caller had tuples.
        spec = TaskSpec(task_id=task_id, app_name=app_name, app_version=app_version, round=round, kind=kind,
                        config=json.loads(json.dumps(config or {})), num_gpus=num_gpus, num_processes=num_processes, requested_by="simulator")
        return self._call("SubmitTask", lambda: self.site.submit(spec, Path(weights)))

    def get_task(self, task_id: str) -> TaskState:
        return self._call("GetTask", lambda: self.site.get(task_id))

    def watch_task(self, task_id: str, timeout: float, after_seq: int = 0) -> Iterator[TaskState]:
        """The task's state now and after every change, until it ends or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            state = self._call("WatchTask", lambda: self.site.wait(task_id, after_seq, min(_WATCH_POLL_S, max(0.0, remaining))))
            if state.seq > after_seq:
                yield state
                after_seq = state.seq
            if state.terminal or remaining <= 0:
                return

    def fetch_result(self, task_id: str, dest: str | os.PathLike, max_bytes: int | None = None, scan=None) -> TaskState:
        """Copy the task's result to ``dest`` (whole or not at all); the site keeps its copy until acknowledged.

        ``scan`` is left unfed (no counts): a copy on one machine has no received bytes to
        count on the way, so the aggregator counts the file itself."""
        path, state = self._call("FetchResult", lambda: self.site.result_file(task_id))
        dest = Path(dest)
        partial = dest.with_name(dest.name + ".part")
        shutil.copyfile(path, partial)
        partial.replace(dest)
        return state

    def acknowledge(self, task_id: str) -> None:
        self._call("AcknowledgeResult", lambda: self.site.acknowledge(task_id))

    def abort(self, task_id: str) -> TaskState:
        return self._call("AbortTask", lambda: self.site.abort(task_id))

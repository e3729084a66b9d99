"""Which queued task runs next: the queue, and the GPU and CPU slots that tasks take.

A GPU runs one task at a time, never more; tasks without GPUs share a fixed number of
CPU slots (``max_concurrent_cpu_tasks`` in ``local/site.yaml``). GPU tasks start in the
order they came, so a task waiting for two GPUs is not starved by later ones needing one.

Federations share a site fairly: when slots are scarce, queued tasks of different runs
(two DAG runs, two federations) take turns, round-robin, the run served longest ago
first, instead of one run's queue going before the other's; within a run, tasks keep
their order. A task's run is the ``run_key`` its server put in its config, or the prefix
of its task id that every task of a run shares.

A task runs as one rank per GPU it takes, or, on CPU, as the ``num_processes`` ranks it
asks for (at most the cores this agent may use); a multi-rank CPU task takes one CPU slot.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from ..errors import TaskRejected
from .task_records import TaskRecord, TaskSpec


class GpuPool:
    """The site's GPU ids, handed out whole to one task each."""

    def __init__(self, gpus: tuple[int, ...]):
        self.gpus = tuple(gpus)
        self._busy: set[int] = set()

    @property
    def free(self) -> list[int]:
        return [g for g in self.gpus if g not in self._busy]

    def take(self, count: int) -> list[int] | None:
        """``count`` free GPU ids (lowest first), now marked busy; None if not enough are free."""
        free = self.free
        if count > len(free):
            return None
        chosen = free[:count]
        self._busy.update(chosen)
        return chosen

    def release(self, ids: list[int]) -> None:
        self._busy.difference_update(ids)


class Scheduler:
    """The queue of tasks waiting for their slots. Not locked itself: callers hold the task lock."""

    def __init__(self, gpus: tuple[int, ...], max_concurrent_cpu_tasks: int, site_name: str):
        self.site_name = site_name
        self.max_concurrent_cpu_tasks = max_concurrent_cpu_tasks
        self.queue: list[TaskRecord] = []
        self._gpus = GpuPool(gpus)
        self._running_cpu = 0
        self._starts = 0
        self._last_start: dict[str, int] = {}  # run -> when (in starts) a task of it last started

    def gpus_needed(self, spec: TaskSpec) -> int:
        """How many GPUs the task takes; :class:`TaskRejected` if the site has fewer."""
        site_gpus = len(self._gpus.gpus)
        wanted = (1 if site_gpus else 0) if spec.num_gpus is None else spec.num_gpus
        if wanted > site_gpus:
            raise TaskRejected(f"task {spec.task_id} asks for {wanted} GPU(s); site {self.site_name!r} has {site_gpus}")
        return wanted

    def ranks_needed(self, spec: TaskSpec, num_gpus: int) -> int:
        """How many ranks the task runs as; :class:`TaskRejected` if the site cannot run that many."""
        if num_gpus > 0:
            return num_gpus  # one rank per GPU; num_processes is for tasks on CPU
        wanted = spec.num_processes or 1
        cores = cpu_limit()
        if wanted > cores:
            raise TaskRejected(
                f"task {spec.task_id} asks for {wanted} processes; site {self.site_name!r} runs a CPU task "
                f"as at most {cores} (the cores its agent may use)"
            )
        return wanted

    def add(self, task: TaskRecord) -> None:
        self.queue.append(task)

    def remove(self, task: TaskRecord) -> None:
        self.queue.remove(task)

    def start_ready(self, start: Callable[[TaskRecord, list[int]], None]) -> None:
        """Hand each queued task whose slot is free to ``start``, in order, with the GPU ids it got.

        ``start`` runs before the next task is considered: a task that cannot start
        releases its slot (:meth:`release`) in time for the tasks behind it.
        """
        gpu_blocked = False
        for task in self._fair_order():
            if task.num_gpus == 0:
                if self._running_cpu >= self.max_concurrent_cpu_tasks:
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
            self.queue.remove(task)
            self._starts += 1
            self._last_start[run_of(task.spec)] = self._starts
            if len(self._last_start) > _RUNS_REMEMBERED:  # a long-lived agent forgets the runs of long ago
                del self._last_start[min(self._last_start, key=self._last_start.__getitem__)]
            start(task, gpus)

    def _fair_order(self) -> list[TaskRecord]:
        """The queue, runs interleaved: each run's first task (the run served longest ago
        first, a run never served before all others), then each run's second, and so on."""
        by_run: dict[str, list[TaskRecord]] = {}
        for task in self.queue:
            by_run.setdefault(run_of(task.spec), []).append(task)
        runs = sorted(by_run, key=lambda run: self._last_start.get(run, 0))  # stable: first come among equals
        order: list[TaskRecord] = []
        for turn in range(max(map(len, by_run.values()), default=0)):
            order.extend(by_run[run][turn] for run in runs if turn < len(by_run[run]))
        return order

    def release(self, task: TaskRecord) -> None:
        """Free the slot of a task that ended (or could not start); its GPUs are in its state."""
        if task.num_gpus == 0:
            self._running_cpu -= 1
        else:
            self._gpus.release(task.state.gpus)


_RUNS_REMEMBERED = 1024
_RUN_TASK_ID = re.compile(r"^([0-9a-f]{16})-r\d{4}-")  # RunSpec.task_id: <run key>-r<round>-<site>...


def run_of(spec: TaskSpec) -> str:
    """Which run a task belongs to, for taking turns: its config's ``run_key``, its task id's
    run prefix, or (a task id of another shape) the task alone."""
    key = spec.config.get("run_key") if isinstance(spec.config, dict) else None
    if isinstance(key, str) and key:
        return key
    match = _RUN_TASK_ID.match(spec.task_id)
    return match.group(1) if match else spec.task_id


def cpu_limit() -> int:
    """The cores this agent may use: the most processes a CPU task may run as."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def task_world_size(gpus: list[int], num_processes: int | None) -> int:
    """The ranks of a task given the GPUs it got: one per GPU, else its ``num_processes`` (1 when unset)."""
    return len(gpus) if gpus else (num_processes or 1)

"""Which queued task runs next: the queue, and the GPU and CPU slots that tasks take.

A GPU runs one task at a time, never more; tasks without GPUs share a fixed number of
CPU slots (``max_concurrent_cpu_tasks`` in ``local/site.yaml``). GPU tasks start in the
order they came, so a task waiting for two GPUs is not starved by later ones needing one.
"""

from __future__ import annotations

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

    def gpus_needed(self, spec: TaskSpec) -> int:
        """How many GPUs the task takes; :class:`TaskRejected` if the site has fewer."""
        site_gpus = len(self._gpus.gpus)
        wanted = (1 if site_gpus else 0) if spec.num_gpus is None else spec.num_gpus
        if wanted > site_gpus:
            raise TaskRejected(f"task {spec.task_id} asks for {wanted} GPU(s); site {self.site_name!r} has {site_gpus}")
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
        for task in list(self.queue):
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
            start(task, gpus)

    def release(self, task: TaskRecord) -> None:
        """Free the slot of a task that ended (or could not start); its GPUs are in its state."""
        if task.num_gpus == 0:
            self._running_cpu -= 1
        else:
            self._gpus.release(task.state.gpus)

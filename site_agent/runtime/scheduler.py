"""Which of the site's GPUs are free: a GPU runs one task at a time, never more."""

from __future__ import annotations


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

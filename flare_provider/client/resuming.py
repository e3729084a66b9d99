"""Running a transfer of weights to its end over a link that breaks: attempts, resuming, giving up.

:class:`ResumingTransfers` is the part of :class:`~.sync.AgentClient` that drives one
upload or download: it tries again after a cut, from where the other end is, and gives
up when the link is gone for good (nothing moved for ``idle_timeout``, too many fruitless
attempts in a row, or past ``transfer_timeout``). What each attempt moved is counted in
its :class:`~.transfer.TransferStats`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from ..wire.chunks import PayloadError, format_bytes
from .channel import RESUME_BACKOFF_S
from .transfer import (
    AGENT_SAYS_RESUME,
    IdleWatchdog,
    StartOver,
    TransferStalled,
    TransferStats,
    counted,
    describe_failure,
    held_bytes,
    is_cut,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class ResumingTransfers:
    """Needs ``site``, ``idle_timeout``, ``transfer_timeout``, ``resume_attempts`` and ``_error`` of the client."""

    site: str
    idle_timeout: float | None
    transfer_timeout: float | None
    resume_attempts: int

    def _send_stream(self, rpc, messages: Iterator, stats: TransferStats, timeout: float | None, probe=None):
        """A client-streaming call that is cancelled when nothing moves for ``idle_timeout``."""
        watchdog = IdleWatchdog(self.idle_timeout, stats, "sent", probe)
        call = rpc.future(counted(messages, stats, watchdog), timeout=timeout)
        with watchdog.watching(call.cancel):
            return call.result()

    def _resuming(self, method: str, stats: TransferStats, attempt: Callable[[], T]) -> T:
        """``attempt()`` until it succeeds; a transfer cut on the way is tried again, resuming.

        Not when it never got going (a site down from the start is the caller's to wait
        for), after ``resume_attempts`` tries in a row that moved nothing, once nothing
        moved for ``idle_timeout``, or past ``transfer_timeout``.
        """
        fruitless = 0
        while True:
            before = stats.transferred_bytes
            stats.attempts += 1
            try:
                result = attempt()
            except (grpc.RpcError, PayloadError, TransferStalled, StartOver) as exc:
                fruitless = 0 if stats.transferred_bytes > before else fruitless + 1
                if not (is_cut(exc) and self._may_resume(stats, fruitless, exc)):
                    raise self._error(method, exc) from None
                if isinstance(exc, grpc.RpcError) and held_bytes(exc) is not None:
                    continue  # not a cut: the site holds bytes from before and said how many; send the rest now
                wait = min(RESUME_BACKOFF_S[1], RESUME_BACKOFF_S[0] * 2**fruitless)
                log.warning(
                    "site %s: %s of task %s cut after %s moved (%s); resuming in %.1f s",
                    self.site, method, stats.task_id, format_bytes(stats.transferred_bytes), describe_failure(exc), wait,
                )
                time.sleep(wait)
                continue
            stats.completed = True
            return result

    def _may_resume(self, stats: TransferStats, fruitless: int, exc: Exception) -> bool:
        # Either bytes moved, or the site itself answered: the link works, it is worth another go.
        answered = isinstance(exc, StartOver) or (isinstance(exc, grpc.RpcError) and exc.code() in AGENT_SAYS_RESUME)
        if not (stats.transferred_bytes > 0 or answered) or fruitless > self.resume_attempts:
            return False
        if self.idle_timeout and stats.idle_for() >= self.idle_timeout:
            return False
        return self._time_left(stats) is None or self._time_left(stats) > 0

    def _time_left(self, stats: TransferStats) -> float | None:
        """What remains of ``transfer_timeout`` for this transfer (None: no bound)."""
        if self.transfer_timeout is None:
            return None
        return max(0.0, self.transfer_timeout - (time.monotonic() - stats.started))

    def _note_start(self, what: str, stats: TransferStats, offset: int) -> None:
        if stats.attempts == 1:
            stats.start_offset = offset
        else:
            stats.resumed_at.append(offset)
        if offset:
            log.info(
                "site %s: resuming the %s of task %s at byte %d%s (attempt %d)", self.site, what, stats.task_id, offset,
                f" of {stats.payload_bytes}" if stats.payload_bytes else "", stats.attempts,
            )


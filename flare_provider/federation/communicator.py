"""Sending tasks to sites and taking back what they return: the layer every workflow stands on.

A workflow (scatter-gather today) says *what* each site should do; the
:class:`SiteCommunicator` does the talking: it submits the tasks (giving a restarting
site ``connect_grace`` to come back, re-attaching to a task the site already has), waits
for them by a :class:`~flare_provider.federation.gather.GatherRule` while following each
site's progress, downloads each result to a file for the workflow to take (counting its NaN
and infinite values on the way: :class:`ReceivedResult`), and
acknowledges or aborts the tasks when the workflow says so. No Airflow here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..client import AgentClient, AgentError, CallerKit
from ..files import safe_name
from ..wire.task_state import FAILED, SUCCEEDED, TaskState
from ..wire.tensors import save_file
from .errors import RoundFailed
from .gather import GatherRule, GatherTally
from .records import InFlight

log = logging.getLogger(__name__)

_PROGRESS_LOG_EVERY_S = 10.0
# Codes after which asking again cannot help: the task is gone, or the site will not have us.
_FINAL_CODES = ("NOT_FOUND", "PERMISSION_DENIED", "INVALID_ARGUMENT")


@dataclass(frozen=True)
class ReceivedResult:
    """A downloaded result: its file, and its non-finite values per floating tensor, counted
    as it arrived (None where they could not be: the workflow's checks count them)."""

    path: Path
    nonfinite: Mapping[str, int] | None = None


# Takes a downloaded result: None when it was accepted, else why it was not.
ResultHandler = Callable[[str, TaskState, ReceivedResult], "str | None"]


@dataclass(frozen=True)
class TaskOrder:
    """What one site is asked to do: the app, the kind of task, its config and the model to start from."""

    app_name: str
    weights: Path | None  # a safetensors file; None sends an empty model
    kind: str = "train"
    config: Mapping[str, Any] = field(default_factory=dict)
    app_version: str | None = None
    num_gpus: int | None = None
    num_processes: int | None = None  # ranks of a task on CPU (see SubmitTaskHeader.num_processes)


def for_each_site(fn: Callable[[str], Any], sites: Iterable[str]) -> dict[str, Any]:
    """``fn(site)`` for every site at once; values are results or the exception raised."""
    sites = list(sites)
    if not sites:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(sites))) as pool:
        futures = {site: pool.submit(fn, site) for site in sites}
    return {site: f.exception() or f.result() for site, f in futures.items()}


class SiteCommunicator:
    """The Airflow side's conversation with a federation's sites, for one run.

    :param kit: the server identity and the sites' endpoints.
    :param work_dir: where downloaded results land (the workflow moves or deletes them).
    :param connect_grace: seconds a site may be unreachable when a task is sent to it.
    """

    def __init__(
        self,
        kit: CallerKit,
        work_dir: Path,
        *,
        connect_grace: float = 10.0,
        client_factory: Callable[[str], AgentClient] | None = None,
        logger: logging.Logger | None = None,
    ):
        self.kit = kit
        self.work_dir = work_dir
        self.connect_grace = connect_grace
        self.log = logger or log
        self._client_factory = client_factory or (lambda site: kit.client(site))
        self._clients: dict[str, AgentClient] = {}

    def client(self, site: str) -> AgentClient:
        if site not in self._clients:
            self._clients[site] = self._client_factory(site)
        return self._clients[site]

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    # ---- send ----------------------------------------------------------------------

    def send(
        self,
        flight: InFlight,
        orders: Mapping[str, TaskOrder],
        retrain_id: Callable[[str, int], str] | None = None,
    ) -> None:
        """Submit each site's task of ``flight``; a site that cannot take it is dropped.

        A succeeded task whose result the site already handed over belongs to a commit that
        is no longer usable (a damaged snapshot): with ``retrain_id`` the site trains again
        under ``retrain_id(site, attempt)``, an id a retried worker derives as well.
        """

        def submit(site: str) -> tuple[TaskState, bool]:
            for attempt in range(1, 100):
                state, created = self._submit_once(site, flight.task_ids[site], flight.round, orders[site])
                if created or state.status != SUCCEEDED or state.result_available or retrain_id is None:
                    return state, created
                self.log.warning("Round %d: site %s handed over task %s already; training again", flight.round, site, state.task_id)
                flight.task_ids[site] = retrain_id(site, attempt)
            raise RoundFailed(f"round {flight.round}: site {site!r} was asked to train again too many times")

        for site, outcome in for_each_site(submit, flight.active_tasks).items():
            if isinstance(outcome, BaseException):
                flight.drop(site, f"submit failed: {outcome}")
                self.log.warning("Round %d: site %s dropped: %s", flight.round, site, outcome)
            elif not outcome[1]:
                flight.reattached.append(site)
                self.log.info("Round %d: re-attached to task %s on site %s (%s)", flight.round, outcome[0].task_id, site, outcome[0].status)

    def _submit_once(self, site: str, task_id: str, round_number: int, order: TaskOrder) -> tuple[TaskState, bool]:
        # A site that just restarted, or a blip in the network, gets connect_grace seconds.
        deadline = time.monotonic() + self.connect_grace
        while True:
            try:
                return self.client(site).submit_task(
                    task_id,
                    order.app_name,
                    order.weights or self._empty_model(),
                    round_number,
                    kind=order.kind,
                    config=dict(order.config),
                    app_version=order.app_version,
                    num_gpus=order.num_gpus,
                    num_processes=order.num_processes,
                )
            except AgentError as exc:
                if exc.code.name != "UNAVAILABLE" or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _empty_model(self) -> Path:
        path = self.work_dir / "empty.safetensors"
        if not path.exists():
            save_file({}, path)
        return path

    # ---- wait and fetch --------------------------------------------------------------

    def gather(self, flight: InFlight, rule: GatherRule, on_result: ResultHandler) -> dict[str, TaskState]:
        """Wait for the flight's sites by ``rule``, handing each downloaded result to ``on_result``.

        Returns the last state of every task that ended; a site that fails, or whose
        result ``on_result`` rejects, is dropped from the flight with the reason.
        """
        pending = list(flight.active_tasks)
        tally = GatherTally(rule, pending)
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        for site in pending:
            threading.Thread(target=self._follow, args=(site, flight, events, stop), daemon=True).start()
        final: dict[str, TaskState] = {}
        last_log = 0.0
        try:
            while not (reason := tally.verdict(time.time())):
                try:
                    site, state, received = events.get(timeout=max(0.05, tally.seconds_to_next_check(time.time())))
                except queue.Empty:
                    continue
                if isinstance(state, Exception):
                    flight.drop(site, str(state))
                    tally.record(site, FAILED, time.time())
                    self.log.warning("Round %d: site %s dropped: %s", flight.round, site, state)
                elif state.terminal:
                    final[site] = state
                    tally.record(site, self._settle(flight, site, state, received, on_result), time.time())
                else:
                    tally.record(site, state.status, time.time())
                    if time.time() - last_log > _PROGRESS_LOG_EVERY_S:
                        last_log = time.time()
                        self.log.info("Round %d: %s; %s", flight.round, tally.summary(), _progress(site, state))
            self.log.info("Round %d: stop waiting: %s", flight.round, reason)
        finally:
            stop.set()
        return final

    def collect(self, flight: InFlight, states: Mapping[str, TaskState], on_result: ResultHandler) -> None:
        """Fetch and hand over the results of tasks seen to end elsewhere (the deferrable trigger)."""
        for site in sorted(states):
            state = states[site]
            if not state.terminal:
                continue  # a straggler: the workflow drops and aborts it
            received = None
            if state.status == SUCCEEDED:
                try:
                    state, received = self._fetch(self.client(site), state.task_id, self._result_path(flight, site))
                except AgentError as exc:
                    flight.drop(site, f"result not fetched: {exc}")
                    continue
            self._settle(flight, site, state, received, on_result)

    @staticmethod
    def _fetch(client: AgentClient, task_id: str, path: Path) -> tuple[TaskState, ReceivedResult]:
        """A task's result downloaded to ``path``, its finite values counted on the way."""
        from ..wire.finite_scan import FiniteScan  # numpy: not on the DAG-parsing path

        scan = FiniteScan()
        state = client.fetch_result(task_id, path, scan=scan)
        return state, ReceivedResult(path, scan.counts())

    def _settle(
        self, flight: InFlight, site: str, state: TaskState, received: ReceivedResult | None, on_result: ResultHandler
    ) -> str:
        """An ended task: its result handed over, or the site dropped. Returns the status the rule counts."""
        if state.status != SUCCEEDED or received is None:
            flight.drop(site, f"task {state.status}: {state.error or 'no error given'}")
            self.log.warning("Round %d: site %s %s: %s", flight.round, site, state.status, state.error)
            return state.status if state.status != SUCCEEDED else FAILED
        try:
            rejected = on_result(site, state, received)
        finally:
            received.path.unlink(missing_ok=True)
        if rejected:
            flight.drop(site, rejected)
            self.log.warning("Round %d: update from %s rejected: %s", flight.round, site, rejected.removeprefix("update rejected: "))
            return FAILED
        return SUCCEEDED

    def _result_path(self, flight: InFlight, site: str) -> Path:
        return self.work_dir / f"update-{flight.round:04d}-{safe_name(site)}.safetensors"

    def _follow(self, site: str, flight: InFlight, events: queue.Queue, stop: threading.Event) -> None:
        """Follow one site's task; on success download the result, then report."""
        task_id = flight.task_ids[site]
        client = self.client(site)
        seq = 0
        failures = 0
        while not stop.is_set() and time.time() < flight.deadline:
            try:
                for state in client.watch_task(task_id, timeout=min(30.0, max(0.1, flight.deadline - time.time())), after_seq=seq):
                    failures = 0
                    seq = state.seq
                    if stop.is_set():
                        return
                    if state.terminal:
                        received = None
                        if state.status == SUCCEEDED:
                            state, received = self._fetch(client, task_id, self._result_path(flight, site))
                        events.put((site, state, received))
                        return
                    events.put((site, state, None))
            except AgentError as exc:
                # A site that restarts keeps its finished results: keep asking until the deadline.
                failures += 1
                if exc.code.name in _FINAL_CODES:
                    events.put((site, exc, None))
                    return
                if failures in (1, 10):
                    self.log.warning("Round %d: site %s not answering (%s); still trying", flight.round, site, exc.code.name)
                stop.wait(min(5.0, 0.2 * 2 ** min(failures, 5)))

    def run_to_end(self, site: str, task_id: str, order: TaskOrder, timeout: float) -> TaskState:
        """One task at one site, waited for in this thread; RoundFailed unless it succeeds in time."""
        client = self.client(site)
        state, _ = self._submit_once(site, task_id, 0, order)
        deadline = time.time() + timeout
        while not state.terminal and time.time() < deadline:
            for state in client.watch_task(task_id, timeout=min(30.0, max(0.1, deadline - time.time())), after_seq=state.seq):
                pass
        if not state.terminal:
            # Nobody waits for it any more: free the site's worker, as for a straggler.
            try:
                client.abort(task_id)
            except AgentError as exc:
                self.log.warning("Could not abort task %s on site %s: %s", task_id, site, exc)
            raise RoundFailed(f"{order.kind} task on site {site!r} did not finish within train_timeout ({timeout:g}s); aborted")
        if state.status != SUCCEEDED:
            raise RoundFailed(f"{order.kind} task on site {site!r} ended {state.status}: {state.error or 'no error given'}")
        return state

    # ---- after the workflow has what it needs ------------------------------------------

    def acknowledge(self, flight: InFlight, states: Mapping[str, TaskState]) -> None:
        """Let the sites forget the results they still hold: the workflow has committed them."""
        for_each_site(lambda s: self.client(s).acknowledge(flight.task_ids[s]), [s for s in states if states[s].result_available])

    def abort(self, flight: InFlight, sites: Iterable[str] | None = None) -> None:
        """Stop the flight's tasks at ``sites`` (default: every site still in it)."""

        def stop(site: str) -> None:
            state = self.client(site).abort(flight.task_ids[site])
            self.log.info("Aborted task %s on site %s (%s)", state.task_id, site, state.status)

        for_each_site(stop, flight.active_tasks if sites is None else sites)

    def abort_stragglers(self, flight: InFlight, states: Mapping[str, TaskState]) -> None:
        """Drop and stop the flight's sites whose task has not ended."""
        late = [s for s in flight.active_tasks if not (s in states and states[s].terminal)]
        for site in late:
            flight.drop(site, "did not finish in time")
        self.abort(flight, late)


def _progress(site: str, state: TaskState) -> str:
    metrics = " ".join(f"{k}={v:.4f}" for k, v in state.metrics.items())
    return f"{site} at {state.progress:.0%} {metrics}".rstrip()

"""Federated rounds: scatter, train at the sites, gather, aggregate, snapshot.

No Airflow here: :class:`~flare_provider.operators.scatter_gather.ScatterGatherOperator`
drives a :class:`FederatedRun` (and, in deferrable mode, its trigger waits in between).

Failover rests on three facts. Task ids are derived from (federation, run, round, site),
so a retried worker submits the same ids and the sites hand back the task they already
have instead of training again. A round's results are acknowledged (and deleted at the
sites) only after the round is committed to the snapshot store. And a resumed run starts
from the newest committed round, with the aggregator's own state restored from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..aggregation import UpdateRejected, make_aggregator
from ..client import AgentClient, AgentError, CallerKit, TaskInfo
from ..snapshots import SnapshotStore
from ..wire.tensors import RESULT_KIND_KEY, TensorFile, TensorFormatError, describe_file, load_file, save_file
from .gather import GatherPolicy

log = logging.getLogger(__name__)

# The agent names a result "weights" or "difference" in the file's metadata; aggregators
# say "weights" or "diff".
_UPDATE_KIND = {"weights": "weights", "difference": "diff"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class RoundFailed(RuntimeError):
    """A round that cannot go on: too few sites, or no acceptable update."""


@dataclass(frozen=True)
class RunSpec:
    """What a federated run does; everything but ``run_id`` enters its config hash."""

    federation: str
    run_id: str
    app_name: str
    sites: tuple[str, ...]
    num_rounds: int
    min_clients: int
    wait_time_after_min_received: float = 10.0
    train_timeout: float = 3600.0
    aggregator: str = "fedavg"
    aggregator_args: Mapping[str, Any] = field(default_factory=dict)
    train_config: Mapping[str, Any] = field(default_factory=dict)
    round_configs: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    app_version: str | None = None
    num_gpus: int | None = None
    snapshot_every: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.num_rounds < 1:
            problems.append(f"num_rounds must be at least 1, got {self.num_rounds}")
        if not self.sites:
            problems.append("no sites to train at")
        if len(set(self.sites)) != len(self.sites):
            problems.append(f"a site is named twice in {list(self.sites)}")
        if not 1 <= self.min_clients <= len(self.sites):
            problems.append(f"min_clients must be between 1 and the number of sites ({len(self.sites)}), got {self.min_clients}")
        if self.wait_time_after_min_received < 0 or self.train_timeout <= 0:
            problems.append("wait_time_after_min_received must be >= 0 and train_timeout > 0")
        if self.snapshot_every < 1:
            problems.append(f"snapshot_every must be at least 1, got {self.snapshot_every}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def config_hash(self) -> str:
        doc = {k: v for k, v in asdict(self).items() if k != "run_id"}
        doc["round_configs"] = {str(k): v for k, v in self.round_configs.items()}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def run_key(self) -> str:
        return hashlib.sha256(f"{self.federation}\0{self.run_id}".encode()).hexdigest()[:16]

    def task_id(self, round_number: int, site: str, kind: str = "train") -> str:
        """The same (run, round, site) always gives the same id: a resubmit re-attaches."""
        suffix = "" if kind == "train" else f"-{kind}"
        return f"{self.run_key}-r{round_number:04d}-{_UNSAFE.sub('_', site)}{suffix}"

    def trainer_config(self, round_number: int, extra: Mapping[str, Any]) -> dict[str, Any]:
        config = {**self.train_config, **self.round_configs.get(round_number, {}), **extra}
        config.update(round=round_number, num_rounds=self.num_rounds)
        return config


@dataclass
class Progress:
    """Where a run stands: the last committed round and the global model after it.

    ``weights`` is a mapping of name -> array; once a round is scattered it is a
    :class:`~flare_provider.wire.tensors.TensorFile` that reads each tensor from the
    engine's copy on disk, so the model is not held in memory while the sites train.
    """

    round: int
    weights: Mapping[str, np.ndarray]
    history: list[dict[str, Any]]
    snapshot_uri: str | None = None

    @property
    def metrics(self) -> dict[str, float]:
        return self.history[-1]["metrics"] if self.history else {}


@dataclass
class InFlight:
    """A scattered round: which sites got which task."""

    round: int
    task_ids: dict[str, str]
    started_at: float
    deadline: float
    dropped: dict[str, str] = field(default_factory=dict)
    reattached: list[str] = field(default_factory=list)


def weighted_metrics(per_site: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Sample-weighted mean of each metric over the sites that reported it."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for report in per_site.values():
        n = report.get("num_samples") or 0
        for name, value in (report.get("metrics") or {}).items():
            sums[name] = sums.get(name, 0.0) + n * float(value)
            weights[name] = weights.get(name, 0.0) + n
    return {name: sums[name] / weights[name] for name in sorted(sums) if weights[name] > 0}


class FederatedRun:
    """One run of a federation: restore, then rounds until ``spec.num_rounds``.

    :param kit: the server identity and the sites' endpoints.
    :param store: where rounds are committed.
    :param initial_model: a safetensors file or URI, ``"previous"`` (the final model of
        the latest finished run of the same federation), or None to have the first
        reachable site initialise the model from the app (the app's seed makes it
        reproducible).
    """

    poll_interval = 0.5
    connect_grace = 10.0  # seconds a site may be unreachable at scatter before it is dropped

    def __init__(
        self,
        spec: RunSpec,
        kit: CallerKit,
        store: SnapshotStore,
        *,
        initial_model: str | None = None,
        client_factory: Callable[[str], AgentClient] | None = None,
        logger: logging.Logger | None = None,
        extra_state: Mapping[str, Any] | None = None,
    ):
        self.spec = spec
        self.kit = kit
        self.store = store
        self.initial_model = initial_model
        self.log = logger or log
        self.extra_state = dict(extra_state or {})
        self._client_factory = client_factory or (lambda site: kit.client(site))
        self._clients: dict[str, AgentClient] = {}
        self._work = Path(tempfile.mkdtemp(prefix="flare-run-"))
        self.aggregator = make_aggregator(spec.aggregator, spill_dir=self._work / "spill", **spec.aggregator_args)
        self.in_flight: InFlight | None = None
        unknown = [s for s in spec.sites if s not in kit.sites]
        if unknown:
            raise ValueError(f"sites {unknown} are not in the server kit of {kit.project!r} (known: {sorted(kit.sites)})")

    # ---- plumbing ---------------------------------------------------------------------

    def client(self, site: str) -> AgentClient:
        if site not in self._clients:
            self._clients[site] = self._client_factory(site)
        return self._clients[site]

    def close(self) -> None:
        self.aggregator.close()
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> "FederatedRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _parallel(self, fn: Callable[[str], Any], sites) -> dict[str, Any]:
        """``fn(site)`` for every site at once; values are results or the exception raised."""
        sites = list(sites)
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(sites)))) as pool:
            futures = {site: pool.submit(fn, site) for site in sites}
        out = {}
        for site, future in futures.items():
            exc = future.exception()
            out[site] = exc if exc is not None else future.result()
        return out

    # ---- restore ----------------------------------------------------------------------

    def restore(self) -> Progress:
        """The newest committed round of this run, or round 0 with the initial model."""
        spec = self.spec
        restored = self.store.restore(spec.federation, spec.run_id)  # a damaged round gives way to the one before
        if restored is None:
            weights = self._initial_weights()
            # Round 0 is the initial model, committed: a retry, or a deferrable run coming back
            # from the triggerer, starts from these very weights instead of asking for new ones.
            uri = self._commit(0, weights, [], {})
            self.log.info("Starting %s run %s at round 1 (model of %d tensors)", spec.federation, spec.run_id, len(weights))
            return Progress(0, weights, [], uri)
        snapshot, weights = restored
        state = snapshot.state
        if state.get("config_hash") != spec.config_hash:
            self.log.warning(
                "The run's configuration changed since round %d was committed (config hash %s, now %s); going on with the new one",
                snapshot.round,
                state.get("config_hash"),
                spec.config_hash,
            )
        self.aggregator.load_state(self.store.load_server_state(snapshot), state.get("aggregator", {}).get("meta", {}))
        self.log.info("Resuming %s run %s after committed round %d (%s)", spec.federation, spec.run_id, snapshot.round, snapshot.uri)
        return Progress(snapshot.round, weights, list(state.get("history", [])), snapshot.uri)

    def _initial_weights(self) -> dict[str, np.ndarray]:
        source = self.initial_model
        if source == "previous":
            final = self.store.find_final(self.spec.federation)
            if final is None:
                self.log.info("No earlier finished run of %s to warm-start from; initialising from the app", self.spec.federation)
                return self._weights_from_site()
            self.log.info("Warm start from the final model of run %s (round %d, %s)", final.run, final.round, final.uri)
            return self.store.load_weights(final)
        if source:
            return self.store.load_initial_weights(source)
        return self._weights_from_site()

    def _weights_from_site(self) -> dict[str, np.ndarray]:
        """Ask one site to build the app's initial model (the Airflow side has no PyTorch)."""
        errors = {}
        for site in sorted(self.spec.sites):
            task_id = self.spec.task_id(0, site, "initialize")
            try:
                info = self._run_to_end(site, task_id, "initialize", {"seed_round": 0}, weights=None)
                path = self._work / f"init-{_UNSAFE.sub('_', site)}.safetensors"
                self.client(site).fetch_result(task_id, path)
                weights = load_file(path)
                self.client(site).acknowledge(task_id)
                self.log.info("Initial model from site %s (%d tensors, %s)", site, len(weights), info.status)
                return weights
            except (AgentError, RoundFailed) as exc:
                errors[site] = str(exc)
        raise RoundFailed(f"no site could initialise the model: {errors}")

    def _run_to_end(self, site: str, task_id: str, kind: str, config: dict, weights: Path | None) -> TaskInfo:
        empty = self._work / "empty.safetensors"
        if not empty.exists():
            save_file({}, empty)
        client = self.client(site)
        info, _ = client.submit_task(
            task_id, self.spec.app_name, weights or empty, 0, kind=kind, config=config, app_version=self.spec.app_version
        )
        deadline = time.time() + self.spec.train_timeout
        while not info.terminal and time.time() < deadline:
            for info in client.watch_task(task_id, timeout=min(30.0, max(0.1, deadline - time.time())), after_seq=info.seq):
                pass
        if not info.terminal:
            # Nobody waits for it any more: free the site's worker, as for a straggler.
            try:
                client.abort(task_id)
            except AgentError as exc:
                self.log.warning("Could not abort task %s on site %s: %s", task_id, site, exc)
            raise RoundFailed(
                f"{kind} task on site {site!r} did not finish within train_timeout ({self.spec.train_timeout:g}s); aborted"
            )
        if info.status != "succeeded":
            raise RoundFailed(f"{kind} task on site {site!r} ended {info.status}: {info.error or 'no error given'}")
        return info

    # ---- a round ----------------------------------------------------------------------

    def scatter(self, progress: Progress) -> InFlight:
        """Send the global weights to every site for round ``progress.round + 1``."""
        spec = self.spec
        number = progress.round + 1
        weights_file = self._spool(progress, number)
        self.aggregator.begin_round(progress.weights, number, spec.sites)
        config = spec.trainer_config(number, self.aggregator.trainer_config())
        now = time.time()
        flight = InFlight(number, {s: spec.task_id(number, s) for s in spec.sites}, now, now + spec.train_timeout)

        def submit(site: str) -> tuple[TaskInfo, bool]:
            # A succeeded task whose result the site handed over already belongs to a commit
            # of this round that is no longer usable (a corrupted snapshot): train again
            # under the next derived id, which a retried worker derives as well.
            for attempt in range(1, 100):
                info, created = submit_once(site)
                if created or info.status != "succeeded" or info.result_available:
                    return info, created
                self.log.warning("Round %d: site %s handed over task %s already; training again", number, site, info.task_id)
                flight.task_ids[site] = spec.task_id(number, site, f"retrain{attempt}")
            raise RoundFailed(f"round {number}: site {site!r} was asked to train again too many times")

        def submit_once(site: str) -> tuple[TaskInfo, bool]:
            # A site that just restarted, or a blip in the network, gets a few seconds.
            deadline = time.monotonic() + self.connect_grace
            while True:
                try:
                    return self.client(site).submit_task(
                        flight.task_ids[site],
                        spec.app_name,
                        weights_file,
                        number,
                        config=config,
                        app_version=spec.app_version,
                        num_gpus=spec.num_gpus,
                    )
                except AgentError as exc:
                    if exc.code.name != "UNAVAILABLE" or time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

        for site, outcome in self._parallel(submit, spec.sites).items():
            if isinstance(outcome, BaseException):
                flight.dropped[site] = f"submit failed: {outcome}"
                self.log.warning("Round %d: site %s dropped: %s", number, site, outcome)
            elif not outcome[1]:
                flight.reattached.append(site)
                self.log.info("Round %d: re-attached to task %s on site %s (%s)", number, outcome[0].task_id, site, outcome[0].status)
        weights_file.unlink(missing_ok=True)  # progress.weights keeps it open: readable until dropped
        reached = len(spec.sites) - len(flight.dropped)
        if reached < spec.min_clients:
            self.abort(flight)
            raise RoundFailed(
                f"round {number}: only {reached} of {len(spec.sites)} sites took the task, min_clients is {spec.min_clients}: "
                + "; ".join(f"{s}: {why}" for s, why in sorted(flight.dropped.items()))
            )
        self.in_flight = flight
        self.log.info("Round %d/%d: scattered to %d sites", number, spec.num_rounds, reached)
        return flight

    def _spool(self, progress: Progress, number: int) -> Path:
        """Write the global model to the work folder and have ``progress`` read it from there.

        From here on the round holds no copy of the model in memory: the aggregator reads
        global tensors back from the file when it needs them (FedAvg only at the end, and
        only if a site sent a difference). The file is written tensor by tensor; it is
        scratch, so it is not fsynced.
        """
        path = self._work / f"global-{number:04d}.safetensors"
        save_file(progress.weights, path, durable=False)
        progress.weights = TensorFile(path)
        return path

    def gather(self, flight: InFlight) -> dict[str, TaskInfo]:
        """Wait for the round's sites per the gather rule, aggregating results as they arrive."""
        policy = GatherPolicy(self.spec.min_clients, self.spec.wait_time_after_min_received, flight.deadline)
        pending = [s for s in flight.task_ids if s not in flight.dropped]
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        threads = [threading.Thread(target=self._watch, args=(s, flight, events, stop), daemon=True) for s in pending]
        for t in threads:
            t.start()
        final: dict[str, TaskInfo] = {}
        statuses = {s: "queued" for s in pending}
        succeeded_since = None
        last_log = 0.0
        try:
            while True:
                reason = policy.done(statuses, succeeded_since, time.time())
                if reason:
                    self.log.info("Round %d: stop waiting: %s", flight.round, reason)
                    break
                try:
                    site, info, path = events.get(timeout=self.poll_interval)
                except queue.Empty:
                    continue
                if isinstance(info, Exception):
                    statuses[site] = "failed"
                    flight.dropped[site] = str(info)
                    self.log.warning("Round %d: site %s dropped: %s", flight.round, site, info)
                    continue
                statuses[site] = info.status
                if info.terminal:
                    final[site] = info
                    if path is not None and self._add_update(flight, site, info, path):
                        if succeeded_since is None and len(self.aggregator.status.accepted) >= self.spec.min_clients:
                            succeeded_since = time.time()
                    elif info.status != "succeeded":
                        flight.dropped[site] = f"task {info.status}: {info.error or ''}".strip()
                        self.log.warning("Round %d: site %s %s: %s", flight.round, site, info.status, info.error)
                    statuses[site] = "succeeded" if site in self.aggregator.status.accepted else "failed"
                elif time.time() - last_log > 10:
                    last_log = time.time()
                    self.log.info("Round %d: %s", flight.round, self._progress_line(statuses, site, info))
        finally:
            stop.set()
        return final

    def _watch(self, site: str, flight: InFlight, events: queue.Queue, stop: threading.Event) -> None:
        """Follow one site's task; on success download the result, then report."""
        task_id = flight.task_ids[site]
        client = self.client(site)
        seq = 0
        failures = 0
        while not stop.is_set() and time.time() < flight.deadline:
            try:
                for info in client.watch_task(task_id, timeout=min(30.0, max(0.1, flight.deadline - time.time())), after_seq=seq):
                    failures = 0
                    seq = info.seq
                    if stop.is_set():
                        return
                    if info.terminal:
                        path = None
                        if info.status == "succeeded":
                            path = self._work / f"update-{flight.round:04d}-{_UNSAFE.sub('_', site)}.safetensors"
                            info = client.fetch_result(task_id, path)
                        events.put((site, info, path))
                        return
                    events.put((site, info, None))
            except AgentError as exc:
                # A site that restarts keeps its finished results: keep asking until the deadline.
                failures += 1
                if exc.code.name in ("NOT_FOUND", "PERMISSION_DENIED", "INVALID_ARGUMENT"):
                    events.put((site, exc, None))
                    return
                if failures in (1, 10):
                    self.log.warning("Round %d: site %s not answering (%s); still trying", flight.round, site, exc.code.name)
                stop.wait(min(5.0, 0.2 * 2**min(failures, 5)))

    def _add_update(self, flight: InFlight, site: str, info: TaskInfo, path: Path) -> bool:
        try:
            # The result file says whether it holds full weights or a difference.
            kind = _UPDATE_KIND.get(describe_file(path)[1].get(RESULT_KIND_KEY, "weights"), "unknown")
            # The file is ours to give: an update that waits for its turn is moved, not copied.
            self.aggregator.add(site, path, info.num_samples, kind, move=True)
            return True
        except (UpdateRejected, TensorFormatError) as exc:
            flight.dropped[site] = f"update rejected: {exc}"
            self.log.warning("Round %d: update from %s rejected: %s", flight.round, site, exc)
            return False
        finally:
            path.unlink(missing_ok=True)

    def resume_round(self, progress: Progress, flight: InFlight) -> None:
        """Deferrable mode, back in a worker: take up the round the trigger watched."""
        self._spool(progress, flight.round).unlink()  # progress.weights keeps it open
        self.aggregator.begin_round(progress.weights, flight.round, self.spec.sites)
        self.in_flight = flight

    def collect(self, flight: InFlight, infos: Mapping[str, TaskInfo]) -> None:
        """Deferrable mode: fetch and aggregate the results the trigger saw finish."""
        for site in sorted(infos):
            info = infos[site]
            if info.status != "succeeded":
                flight.dropped[site] = f"task {info.status}: {info.error or 'no result in time'}"
                continue
            path = self._work / f"update-{flight.round:04d}-{_UNSAFE.sub('_', site)}.safetensors"
            try:
                info = self.client(site).fetch_result(info.task_id, path)
            except AgentError as exc:
                flight.dropped[site] = f"result not fetched: {exc}"
                continue
            self._add_update(flight, site, info, path)

    def finish_round(self, progress: Progress, flight: InFlight, infos: Mapping[str, TaskInfo]) -> Progress:
        """Drop the stragglers, aggregate, commit the snapshot, then acknowledge the results at the sites."""
        self._abort_stragglers(flight, infos)
        status = self.aggregator.status
        accepted = dict(status.accepted)
        if len(accepted) < self.spec.min_clients:
            self.aggregator.abort()
            self.abort(flight)
            raise RoundFailed(
                f"round {flight.round}: only {len(accepted)} acceptable results, min_clients is {self.spec.min_clients}; "
                + "; ".join(f"{s}: {why}" for s, why in sorted(flight.dropped.items()))
            )
        weights = self.aggregator.finish()
        per_site = {
            site: {
                "status": infos[site].status if site in infos else "dropped",
                "task_id": flight.task_ids[site],
                "num_samples": accepted.get(site, 0),
                "metrics": dict(infos[site].metrics) if site in infos else {},
                "error": flight.dropped.get(site),
                "reattached": site in flight.reattached,
            }
            for site in flight.task_ids
        }
        record = {
            "round": flight.round,
            "started_at": flight.started_at,
            "duration_s": round(time.time() - flight.started_at, 3),
            "accepted": sorted(accepted),
            "dropped": dict(sorted(flight.dropped.items())),
            "num_samples": sum(accepted.values()),
            "sites": per_site,
            "metrics": weighted_metrics({s: per_site[s] for s in accepted}),
        }
        history = [*progress.history, record]
        uri = progress.snapshot_uri
        if flight.round % self.spec.snapshot_every == 0 or flight.round == self.spec.num_rounds:
            uri = self._commit(flight.round, weights, history, flight.task_ids)
        # Only now may the sites forget their results: the round is safe in the store.
        self._parallel(lambda s: self.client(s).acknowledge(flight.task_ids[s]), [s for s in infos if infos[s].result_available])
        self.in_flight = None
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in record["metrics"].items()) or "no metrics"
        self.log.info(
            "Round %d/%d done: %d/%d sites answered in %.1fs; %s",
            flight.round,
            self.spec.num_rounds,
            len(accepted),
            len(flight.task_ids),
            record["duration_s"],
            metrics,
        )
        return Progress(flight.round, weights, history, uri)

    def _commit(self, number: int, weights: Mapping[str, np.ndarray], history: list, task_ids: Mapping[str, str]) -> str:
        """Commit round ``number`` with the run's full state; returns its snapshot URI."""
        tensors, meta = self.aggregator.state()
        spec = self.spec
        state = {
            "federation": spec.federation,
            "run": spec.run_id,
            "round": number,
            "num_rounds": spec.num_rounds,
            "app": {"name": spec.app_name, "version": spec.app_version},
            "aggregator": {"name": spec.aggregator, "args": dict(spec.aggregator_args), "meta": meta},
            "config_hash": spec.config_hash,
            "task_ids": dict(task_ids),
            "history": history,
            **self.extra_state,
        }
        return self.store.commit_round(spec.federation, spec.run_id, number, weights, state, state_tensors=tensors)

    def abort(self, flight: InFlight | None = None) -> None:
        """Stop the round's trainings at the sites (stragglers, or everything on kill)."""
        flight = flight or self.in_flight
        if flight is None:
            return

        def stop(site: str) -> None:
            info = self.client(site).abort(flight.task_ids[site])
            self.log.info("Aborted task %s on site %s (%s)", info.task_id, site, info.status)

        self._parallel(stop, [s for s in flight.task_ids if s not in flight.dropped])

    @staticmethod
    def _progress_line(statuses: Mapping[str, str], site: str, info: TaskInfo) -> str:
        counts: dict[str, int] = {}
        for s in statuses.values():
            counts[s] = counts.get(s, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        metrics = " ".join(f"{k}={v:.4f}" for k, v in info.metrics.items())
        return f"{summary}; {site} at {info.progress:.0%} {metrics}".rstrip()

    # ---- the whole run ----------------------------------------------------------------

    def run_rounds(self, progress: Progress) -> Progress:
        """Rounds after ``progress`` until ``num_rounds``, waiting in this process."""
        while progress.round < self.spec.num_rounds:
            flight = self.scatter(progress)
            progress = self.finish_round(progress, flight, self.gather(flight))
        return progress

    def finalize(self, progress: Progress) -> str:
        """Mark the last round as this run's final model (what warm starts pick up)."""
        return self.store.mark_final(self.spec.federation, self.spec.run_id, progress.round)

    def run(self) -> Progress:
        """Restore, run the remaining rounds, mark the final model."""
        progress = self.run_rounds(self.restore())
        self.finalize(progress)
        return progress

    def _abort_stragglers(self, flight: InFlight, infos: Mapping[str, TaskInfo]) -> None:
        late = [s for s in flight.task_ids if s not in flight.dropped and not (s in infos and infos[s].terminal)]
        for site in late:
            flight.dropped[site] = "did not finish in time"
        if late:
            self.abort(InFlight(flight.round, {s: flight.task_ids[s] for s in late}, flight.started_at, flight.deadline))

    def evaluate(self, progress: Progress) -> dict[str, Any]:
        """Every site evaluates the final global model on its own data."""
        weights_file = self._work / "final.safetensors"
        save_file(progress.weights, weights_file)
        config = self.spec.trainer_config(progress.round, {})

        def one(site: str) -> dict[str, Any]:
            task_id = self.spec.task_id(progress.round, site, "evaluate")
            info = self._run_to_end(site, task_id, "evaluate", config, weights_file)
            if info.result_available:
                self.client(site).acknowledge(task_id)
            return {"num_samples": info.num_samples, "metrics": dict(info.metrics)}

        per_site = {}
        for site, outcome in self._parallel(one, self.spec.sites).items():
            if isinstance(outcome, BaseException):
                self.log.warning("Final evaluation on site %s failed: %s", site, outcome)
                per_site[site] = {"error": str(outcome)}
            else:
                per_site[site] = outcome
        reported = {s: r for s, r in per_site.items() if "metrics" in r}
        return {"sites": per_site, "global": weighted_metrics(reported)}

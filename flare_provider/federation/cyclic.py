"""Cyclic weight transfer: the model travels from site to site, each training on the last one's output.

No Airflow here: :class:`~flare_provider.operators.cyclic.CyclicOperator` drives a
:class:`CyclicRun`. A run is ``num_rounds`` rounds; in each round every site trains once,
in the round's visiting order (``fixed``, ``random``, or ``random_no_repeat``: random, but
a round never starts at the site that ended the round before). A random order comes from
the plan's seed and the run, so a retried worker computes the same order.

Each *hop* (one site training the model once) is a step of its own: sent through the
:class:`~flare_provider.federation.communicator.SiteCommunicator` under a task id derived
from (run, hop, site), committed with :class:`~flare_provider.federation.checkpoints.RunCheckpoints`
(snapshot folder ``round_<hop>``), then acknowledged. A worker that dies mid-cycle resumes
after the last committed hop and re-attaches to the task the site already has, as
scatter-gather does. A site that fails its hop stops the run, or, with
``on_failure="skip"``, is passed over (the reason logged and kept in the hop's record) and
the unchanged model goes on to the next site.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..aggregation import ModelSpec, UpdateRejected, validate_update
from ..client import AgentClient, CallerKit
from ..snapshots import SnapshotStore
from ..tracking.tracker import MlflowSettings, RunTracking
from ..wire.task_state import TaskState
from ..wire.tensors import RESULT_KIND_KEY, TensorFile, TensorFormatError, describe_file, load_file, save_file
from .checkpoints import RunCheckpoints
from .communicator import ReceivedResult, ResultHandler, SiteCommunicator, TaskOrder
from .cyclic_plan import CyclicPlan, visiting_orders
from .errors import RoundFailed
from .evaluation import evaluate_at_sites
from .gather import GatherRule
from .records import InFlight, Progress, RoundRecord, RunSpec, SiteRound, read_history

log = logging.getLogger(__name__)

_NO_AGGREGATOR: tuple[dict, dict] = ({}, {})  # nothing is aggregated: no aggregator state


class CyclicRun:
    """One cyclic run: restore, then hops until every site trained in each of ``spec.num_rounds`` rounds.

    ``Progress.round`` counts hops here (``spec.num_rounds * len(spec.sites)`` in all). Of the
    spec's gather settings only ``train_timeout`` (how long one hop may take) applies.
    """

    def __init__(
        self,
        spec: RunSpec,
        kit: CallerKit,
        store: SnapshotStore,
        *,
        plan: CyclicPlan | None = None,
        initial_model: str | None = None,
        warm_start: str = "last",
        client_factory: Callable[[str], AgentClient] | None = None,
        logger: logging.Logger | None = None,
        extra_state: Mapping[str, Any] | None = None,
        mlflow: MlflowSettings | None = None,
    ):
        unknown = [s for s in spec.sites if s not in kit.sites]
        if unknown:
            raise ValueError(f"sites {unknown} are not in the server kit of {kit.project!r} (known: {sorted(kit.sites)})")
        self.spec = spec
        self.store = store
        self.plan = plan or CyclicPlan()
        self.initial_model = initial_model
        self.warm_start = warm_start
        self.log = logger or log
        self.orders = visiting_orders(self.plan, spec.sites, spec.run_key, spec.num_rounds)
        self.num_hops = spec.num_rounds * len(spec.sites)
        self._work = Path(tempfile.mkdtemp(prefix="flare-cyclic-"))
        self.checkpoints = RunCheckpoints(spec, store, extra_state, self.log)
        self.sites = SiteCommunicator(
            kit, self._work, connect_grace=spec.connect_grace, client_factory=client_factory, logger=self.log
        )
        self.in_flight: InFlight | None = None
        self.tracking = RunTracking(spec, store, self.log, mlflow, extra_state)  # each hop's curves (docs/tracking.md)

    def close(self) -> None:
        self.sites.close()
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> "CyclicRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hop(self, number: int) -> tuple[int, str]:
        """The round of hop ``number`` (from 1) and the site that trains in it."""
        per_round = len(self.spec.sites)
        round_number = (number - 1) // per_round + 1
        return round_number, self.orders[round_number - 1][(number - 1) % per_round]

    # ---- the whole run ----------------------------------------------------------------

    def run(self) -> Progress:
        """Restore, run the remaining hops, mark the final model."""
        progress = self.run_hops(self.restore())
        self.finalize(progress)
        return progress

    def run_hops(self, progress: Progress) -> Progress:
        """Hops after ``progress`` to the end, waiting in this process."""
        while not self.finished(progress):
            flight = self.send(progress)
            states = self.wait(progress, flight) if flight.active_tasks else {}
            progress = self.finish_hop(progress, flight, states)
        return progress

    def finished(self, progress: Progress) -> bool:
        return progress.round >= self.num_hops

    def restore(self) -> Progress:
        """The newest committed hop of this run, or hop 0 with the initial model (committed)."""
        spec = self.spec
        restored = self.checkpoints.latest()
        if restored is None:
            weights = self.checkpoints.initial_weights(self.initial_model, self.sites, self.warm_start)
            uri = self.checkpoints.commit(0, weights, [], {}, _NO_AGGREGATOR, self._state())
            self.log.info("Starting cyclic run %s of %s: %d rounds over %d sites, %d hops; orders %s",
                          spec.run_id, spec.federation, spec.num_rounds, len(spec.sites), self.num_hops, self.orders)
            return self._progress(0, weights, [], uri)
        snapshot, weights = restored
        round_number, _ = self.hop(max(snapshot.round, 1))
        self.tracking.resume(snapshot.round)
        self.log.info("Resuming cyclic run %s of %s after committed hop %d/%d (round %d, %s)",
                      spec.run_id, spec.federation, snapshot.round, self.num_hops, round_number, snapshot.uri)
        return self._progress(snapshot.round, weights, read_history(snapshot.state.get("history")), snapshot.uri)

    def _progress(self, number: int, weights: Mapping[str, Any], history: list[RoundRecord], uri: str | None) -> Progress:
        """Progress whose model is read from a file in the work folder: the file each hop sends."""
        path = self._model_path(number)
        save_file(weights, path, durable=False)
        return Progress(number, TensorFile(path), history, uri)

    def _model_path(self, number: int) -> Path:
        return self._work / f"model-{number:05d}.safetensors"

    def _state(self) -> dict[str, Any]:
        return {"cyclic": {**asdict(self.plan), "hops": self.num_hops, "orders": self.orders}}

    def finalize(self, progress: Progress) -> str:
        """Mark the last hop as this run's final model (what warm starts pick up)."""
        uri = self.checkpoints.finalize(progress.round)
        self.tracking.run_finished(progress.round)
        return uri

    # ---- a hop ------------------------------------------------------------------------

    def send(self, progress: Progress) -> InFlight:
        """Send the model to the site of hop ``progress.round + 1``; a site that cannot take it is dropped."""
        spec = self.spec
        number = progress.round + 1
        round_number, site = self.hop(number)
        order = TaskOrder(
            spec.app_name,
            Path(progress.weights.path),
            "train",
            spec.trainer_config(round_number, {"hop": number, "num_hops": self.num_hops}),
            spec.app_version,
            spec.num_gpus,
            spec.num_processes,
        )
        now = time.time()
        flight = InFlight(number, {site: spec.task_id(number, site)}, now, now + spec.train_timeout)
        self.sites.send(flight, {site: order}, lambda s, n: spec.task_id(number, s, f"retrain{n}"))
        self.in_flight = flight
        if flight.active_tasks:
            self.log.info("Hop %d/%d (round %d/%d): model sent to %s", number, self.num_hops, round_number, spec.num_rounds, site)
        return flight

    def rule(self, flight: InFlight) -> GatherRule:
        """One site, no grace, bounded by ``train_timeout`` (the trigger gets the same rule)."""
        return GatherRule(1, 0.0, flight.deadline)

    def wait(self, progress: Progress, flight: InFlight) -> dict[str, TaskState]:
        """Wait for the hop's site and take its model."""
        return self.sites.gather(flight, self.rule(flight), self._taker(progress, flight.round))

    def resume_hop(self, flight: InFlight, event: Mapping[str, Any]) -> Progress:
        """Deferrable mode, back in a worker: finish the hop the trigger watched (unless committed already)."""
        progress = self.restore()
        if progress.round >= flight.round:
            self.log.info("Hop %d is committed already", flight.round)
            return progress
        self.in_flight = flight
        states = {site: TaskState.from_dict(doc) for site, doc in (event.get("tasks") or {}).items()}
        for site, error in (event.get("errors") or {}).items():
            flight.drop(site, f"unreachable: {error}")
        self.sites.collect(flight, states, self._taker(progress, flight.round))
        return self.finish_hop(progress, flight, states)

    def _taker(self, progress: Progress, number: int) -> ResultHandler:
        """Takes the site's result as the model of hop ``number``; why it was refused, or None."""
        current = progress.weights

        def take(site: str, state: TaskState, received: ReceivedResult) -> str | None:
            dest, path = self._model_path(number), received.path
            try:
                validate_update(ModelSpec.of(current), path, site=site, nonfinite=received.nonfinite)
                kind = describe_file(path)[1].get(RESULT_KIND_KEY, "weights")
                if kind == "weights":
                    shutil.move(path, dest)  # the communicator's file is ours to take
                elif kind == "difference":
                    change = load_file(path)
                    save_file({name: current[name] + change[name] for name in current}, dest, durable=False)
                else:
                    return f"update rejected: result of unknown kind {kind!r}"
            except (UpdateRejected, TensorFormatError) as exc:
                return f"update rejected: {exc}"
            return None

        return take

    def finish_hop(self, progress: Progress, flight: InFlight, states: Mapping[str, TaskState]) -> Progress:
        """Commit the hop's model (or, skipping a failed site, the unchanged one), then acknowledge."""
        spec = self.spec
        self.sites.abort_stragglers(flight, states)
        number = flight.round
        round_number, site = self.hop(number)
        model = self._model_path(number)
        trained = site not in flight.dropped and model.exists()
        record = self._record(flight, site, states.get(site), trained)
        if not trained:
            why = flight.dropped.get(site, "no result")
            self.in_flight = None
            if self.plan.on_failure == "stop":
                self.log.error("Hop %d (round %d): site %s failed: %s; stopping (on_failure='stop')", number, round_number, site, why)
                raise RoundFailed(f"hop {number} (round {round_number}): site {site!r} failed: {why}; on_failure is 'stop'")
            self.log.warning("Hop %d (round %d): site %s skipped: %s; the model goes on unchanged", number, round_number, site, why)
            skipped = 1
            for earlier in reversed(progress.history):
                if earlier.accepted:
                    break
                skipped += 1
            if skipped >= len(spec.sites):
                raise RoundFailed(f"hop {number}: no site trained in the last {skipped} hops (the last, {site!r}: {why})")
            model = Path(progress.weights.path)
        history = [*progress.history, record]
        self.tracking.round_done(record, states)  # the hop's curves, before its commit
        uri = self.checkpoints.commit(number, model, history, flight.task_ids, _NO_AGGREGATOR, self._state())
        # Only now may the site forget its result: the hop is safe in the store.
        self.sites.acknowledge(flight, states)
        self.in_flight = None
        if trained:
            Path(progress.weights.path).unlink(missing_ok=True)  # superseded; still open for reading
            self.log.info("Hop %d/%d done (round %d, site %s) in %.1fs; %s", number, self.num_hops, round_number, site,
                          record.duration_s, ", ".join(f"{k}={v:.4f}" for k, v in record.metrics.items()) or "no metrics")
        return Progress(number, TensorFile(model), history, uri)

    @staticmethod
    def _record(flight: InFlight, site: str, state: TaskState | None, trained: bool) -> RoundRecord:
        samples = state.num_samples if trained and state is not None else 0
        report = SiteRound(
            status=state.status if state is not None else "dropped",
            task_id=flight.task_ids[site],
            num_samples=samples,
            metrics=dict(state.metrics) if state is not None else {},
            error=flight.dropped.get(site),
            reattached=site in flight.reattached,
        )
        return RoundRecord(
            round=flight.round,
            started_at=flight.started_at,
            duration_s=round(time.time() - flight.started_at, 3),
            accepted=[site] if trained else [],
            dropped=dict(sorted(flight.dropped.items())),
            num_samples=samples,
            sites={site: report},
            metrics=dict(report.metrics) if trained else {},
        )

    def abort(self, flight: InFlight | None = None) -> None:
        """Stop the hop's training at its site (the task killed)."""
        flight = flight or self.in_flight
        if flight is not None:
            self.sites.abort(flight)

    # ---- after the last hop -------------------------------------------------------------

    def evaluate(self, progress: Progress) -> dict[str, Any]:
        """Every site evaluates the final model on its own data."""
        round_number, _ = self.hop(max(progress.round, 1))
        return evaluate_at_sites(self.sites, self.spec, Path(progress.weights.path), progress.round,
                                 self.spec.trainer_config(round_number, {}), self.log)

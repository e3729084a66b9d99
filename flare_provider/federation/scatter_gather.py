"""Scatter-gather rounds: send the global model, gather the sites' updates, aggregate, commit.

No Airflow here: :class:`~flare_provider.operators.scatter_gather.ScatterGatherOperator`
drives a :class:`ScatterGatherRun` (and, in deferrable mode, its trigger waits in between).
A round reads top to bottom in :meth:`ScatterGatherRun.run_rounds`: scatter, gather,
finish (aggregate, commit, acknowledge); the talking to sites is the
:class:`~flare_provider.federation.communicator.SiteCommunicator`'s.

Failover rests on three facts. Task ids are derived from (federation, run, round, site),
so a retried worker submits the same ids and the sites hand back the task they already
have instead of training again. A round's results are acknowledged (and deleted at the
sites) only after the round is committed to the snapshot store. And a resumed run starts
from the newest committed round, with the aggregator's own state restored from it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..aggregation import UpdateRejected, make_aggregator
from ..client import AgentClient, CallerKit
from ..snapshots import SnapshotStore
from ..wire.task_state import TaskState
from ..wire.tensors import RESULT_KIND_KEY, TensorFile, TensorFormatError, describe_file, save_file
from .checkpoints import RunCheckpoints
from .communicator import SiteCommunicator, TaskOrder, for_each_site
from .errors import RoundFailed
from .gather import GatherRule
from .records import InFlight, Progress, RoundRecord, RunSpec, SiteRound, read_history, weighted_metrics

log = logging.getLogger(__name__)

# The agent names a result "weights" or "difference" in the file's metadata; aggregators
# say "weights" or "diff".
_UPDATE_KIND = {"weights": "weights", "difference": "diff"}


class ScatterGatherRun:
    """One run of a federation: restore, then rounds until ``spec.num_rounds``.

    :param kit: the server identity and the sites' endpoints.
    :param store: where rounds are committed.
    :param initial_model: a safetensors file or URI, ``"previous"`` (the final model of
        the latest finished run of the same federation), or None to have the first
        reachable site initialise the model from the app (the app's seed makes it
        reproducible).
    """

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
        unknown = [s for s in spec.sites if s not in kit.sites]
        if unknown:
            raise ValueError(f"sites {unknown} are not in the server kit of {kit.project!r} (known: {sorted(kit.sites)})")
        self.spec = spec
        self.store = store
        self.initial_model = initial_model
        self.log = logger or log
        self._work = Path(tempfile.mkdtemp(prefix="flare-run-"))
        self.checkpoints = RunCheckpoints(spec, store, extra_state, self.log)
        self.sites = SiteCommunicator(
            kit, self._work, connect_grace=spec.connect_grace, client_factory=client_factory, logger=self.log
        )
        self.aggregator = make_aggregator(spec.aggregator, spill_dir=self._work / "spill", **spec.aggregator_args)
        self.in_flight: InFlight | None = None

    def close(self) -> None:
        self.aggregator.close()
        self.sites.close()
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> "ScatterGatherRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the whole run ----------------------------------------------------------------

    def run(self) -> Progress:
        """Restore, run the remaining rounds, mark the final model."""
        progress = self.run_rounds(self.restore())
        self.finalize(progress)
        return progress

    def run_rounds(self, progress: Progress) -> Progress:
        """Rounds after ``progress`` until ``num_rounds``, waiting in this process."""
        while progress.round < self.spec.num_rounds:
            flight = self.scatter(progress)
            progress = self.finish_round(progress, flight, self.gather(flight))
        return progress

    def restore(self) -> Progress:
        """The newest committed round of this run, or round 0 with the initial model (committed)."""
        spec = self.spec
        restored = self.checkpoints.latest()
        if restored is None:
            weights = self.checkpoints.initial_weights(self.initial_model, self.sites)
            # Round 0 is the initial model, committed: a retry, or a deferrable run coming back
            # from the triggerer, starts from these very weights instead of asking for new ones.
            uri = self.checkpoints.commit(0, weights, [], {}, self.aggregator.state())
            self.log.info("Starting %s run %s at round 1 (model of %d tensors)", spec.federation, spec.run_id, len(weights))
            return Progress(0, weights, [], uri)
        snapshot, weights = restored
        self.aggregator.load_state(self.store.load_server_state(snapshot), snapshot.state.get("aggregator", {}).get("meta", {}))
        self.log.info("Resuming %s run %s after committed round %d (%s)", spec.federation, spec.run_id, snapshot.round, snapshot.uri)
        return Progress(snapshot.round, weights, read_history(snapshot.state.get("history")), snapshot.uri)

    def finalize(self, progress: Progress) -> str:
        """Mark the last round as this run's final model (what warm starts pick up)."""
        return self.checkpoints.finalize(progress.round)

    # ---- a round ----------------------------------------------------------------------

    def scatter(self, progress: Progress) -> InFlight:
        """Send the global weights to every site for round ``progress.round + 1``."""
        spec = self.spec
        number = progress.round + 1
        weights_file = self._spool(progress, number)
        self.aggregator.begin_round(progress.weights, number, spec.sites)
        order = TaskOrder(
            spec.app_name,
            weights_file,
            "train",
            spec.trainer_config(number, self.aggregator.trainer_config()),
            spec.app_version,
            spec.num_gpus,
        )
        now = time.time()
        flight = InFlight(number, {s: spec.task_id(number, s) for s in spec.sites}, now, now + spec.train_timeout)
        self.sites.send(flight, dict.fromkeys(spec.sites, order), lambda site, n: spec.task_id(number, site, f"retrain{n}"))
        weights_file.unlink(missing_ok=True)  # progress.weights keeps it open: readable until dropped
        reached = len(flight.active_tasks)
        if reached < spec.min_clients:
            self.sites.abort(flight)
            raise RoundFailed(
                f"round {number}: only {reached} of {len(spec.sites)} sites took the task, min_clients is {spec.min_clients}: "
                + _reasons(flight)
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

    def rule(self, flight: InFlight) -> GatherRule:
        """When the round stops waiting (the trigger gets the same rule)."""
        return GatherRule(self.spec.min_clients, self.spec.wait_time_after_min_received, flight.deadline)

    def gather(self, flight: InFlight) -> dict[str, TaskState]:
        """Wait for the round's sites per the gather rule, aggregating results as they arrive."""
        return self.sites.gather(flight, self.rule(flight), self._add_update)

    def _add_update(self, site: str, state: TaskState, path: Path) -> str | None:
        """Fold one site's result into the aggregate; why it was rejected, or None."""
        try:
            # The result file says whether it holds full weights or a difference.
            kind = _UPDATE_KIND.get(describe_file(path)[1].get(RESULT_KIND_KEY, "weights"), "unknown")
            # The file is ours to give: an update that waits for its turn is moved, not copied.
            self.aggregator.add(site, path, state.num_samples, kind, move=True)
            return None
        except (UpdateRejected, TensorFormatError) as exc:
            return f"update rejected: {exc}"

    def resume_round(self, flight: InFlight, event: Mapping[str, Any]) -> Progress:
        """Deferrable mode, back in a worker: finish the round the trigger watched.

        ``event`` is the trigger's: each watched site's last task state (``tasks``) and the
        sites it could not reach (``errors``). A round an earlier try committed already is
        not done again.
        """
        progress = self.restore()
        if progress.round >= flight.round:
            self.log.info("Round %d is committed already", flight.round)
            return progress
        self._spool(progress, flight.round).unlink()  # progress.weights keeps it open
        self.aggregator.begin_round(progress.weights, flight.round, self.spec.sites)
        self.in_flight = flight
        states = {site: TaskState.from_dict(doc) for site, doc in (event.get("tasks") or {}).items()}
        for site, error in (event.get("errors") or {}).items():
            flight.drop(site, f"unreachable: {error}")
        self.log.info("Round %d: %s", flight.round, event.get("reason"))
        self.sites.collect(flight, states, self._add_update)
        return self.finish_round(progress, flight, states)

    def finish_round(self, progress: Progress, flight: InFlight, states: Mapping[str, TaskState]) -> Progress:
        """Drop the stragglers, aggregate, commit the snapshot, then acknowledge the results at the sites."""
        self.sites.abort_stragglers(flight, states)
        accepted = dict(self.aggregator.status.accepted)
        if len(accepted) < self.spec.min_clients:
            self.aggregator.abort()
            self.abort(flight)
            raise RoundFailed(
                f"round {flight.round}: only {len(accepted)} acceptable results, min_clients is {self.spec.min_clients}; "
                + _reasons(flight)
            )
        weights = self.aggregator.finish()
        record = self._record(flight, states, accepted)
        history = [*progress.history, record]
        uri = progress.snapshot_uri
        if flight.round % self.spec.snapshot_every == 0 or flight.round == self.spec.num_rounds:
            uri = self.checkpoints.commit(flight.round, weights, history, flight.task_ids, self.aggregator.state())
        # Only now may the sites forget their results: the round is safe in the store.
        self.sites.acknowledge(flight, states)
        self.in_flight = None
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in record.metrics.items()) or "no metrics"
        self.log.info(
            "Round %d/%d done: %d/%d sites answered in %.1fs; %s",
            flight.round,
            self.spec.num_rounds,
            len(accepted),
            len(flight.task_ids),
            record.duration_s,
            metrics,
        )
        return Progress(flight.round, weights, history, uri)

    @staticmethod
    def _record(flight: InFlight, states: Mapping[str, TaskState], accepted: Mapping[str, int]) -> RoundRecord:
        per_site = {
            site: SiteRound(
                status=states[site].status if site in states else "dropped",
                task_id=flight.task_ids[site],
                num_samples=accepted.get(site, 0),
                metrics=dict(states[site].metrics) if site in states else {},
                error=flight.dropped.get(site),
                reattached=site in flight.reattached,
            )
            for site in flight.task_ids
        }
        return RoundRecord(
            round=flight.round,
            started_at=flight.started_at,
            duration_s=round(time.time() - flight.started_at, 3),
            accepted=sorted(accepted),
            dropped=dict(sorted(flight.dropped.items())),
            num_samples=sum(accepted.values()),
            sites=per_site,
            metrics=weighted_metrics({s: per_site[s] for s in accepted}),
        )

    def abort(self, flight: InFlight | None = None) -> None:
        """Stop the round's trainings at the sites (too few results, or the task killed)."""
        flight = flight or self.in_flight
        if flight is not None:
            self.sites.abort(flight)

    # ---- after the last round -----------------------------------------------------------

    def evaluate(self, progress: Progress) -> dict[str, Any]:
        """Every site evaluates the final global model on its own data."""
        weights_file = self._work / "final.safetensors"
        save_file(progress.weights, weights_file)
        order = TaskOrder(
            self.spec.app_name, weights_file, "evaluate", self.spec.trainer_config(progress.round, {}), self.spec.app_version
        )

        def one(site: str) -> SiteRound:
            task_id = self.spec.task_id(progress.round, site, "evaluate")
            state = self.sites.run_to_end(site, task_id, order, self.spec.train_timeout)
            if state.result_available:
                self.sites.client(site).acknowledge(task_id)
            return SiteRound(state.status, task_id, state.num_samples, dict(state.metrics))

        per_site: dict[str, dict[str, Any]] = {}
        reported: dict[str, SiteRound] = {}
        for site, outcome in for_each_site(one, self.spec.sites).items():
            if isinstance(outcome, BaseException):
                self.log.warning("Final evaluation on site %s failed: %s", site, outcome)
                per_site[site] = {"error": str(outcome)}
            else:
                reported[site] = outcome
                per_site[site] = {"num_samples": outcome.num_samples, "metrics": outcome.metrics}
        return {"sites": per_site, "global": weighted_metrics(reported)}


def _reasons(flight: InFlight) -> str:
    return "; ".join(f"{s}: {why}" for s, why in sorted(flight.dropped.items()))


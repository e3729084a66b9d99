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

import json
import logging
import shutil
import tempfile
import time
from collections import ChainMap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..aggregation import UpdateRejected, make_aggregator
from ..aggregation.central_dp import CentralDP, with_central_dp
from ..client import AgentClient, CallerKit
from ..client.transfer import save_for_upload
from ..snapshots import SnapshotStore
from ..tracking.tracker import MlflowSettings, RunTracking
from ..wire.task_state import TaskState
from ..wire.tensors import RESULT_KIND_KEY, RESULT_PRIVACY_KEY, TensorFile, TensorFormatError, describe_file, save_file
from .checkpoints import RunCheckpoints
from .communicator import ReceivedResult, SiteCommunicator, TaskOrder
from .cross_site import SharedLocalModels
from .errors import RoundFailed
from .evaluation import evaluate_at_sites
from .gather import GatherRule
from .records import InFlight, Progress, RoundRecord, RunSpec, SiteRound, read_history, weighted_metrics
from .selection import BestRound, SelectionRule

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
    :param warm_start: with ``initial_model="previous"``, ``"last"`` or ``"best"``: which
        round of the earlier run to start from.
    :param selection: how rounds are scored to keep the best one and stop early (see
        :class:`~flare_provider.federation.selection.SelectionRule`); default: neither.
    :param mlflow: an MLflow tracking server that gets the run and a child run per site (docs/tracking.md).
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
        warm_start: str = "last",
        selection: SelectionRule | None = None,
        mlflow: MlflowSettings | None = None,
    ):
        unknown = [s for s in spec.sites if s not in kit.sites]
        if unknown:
            raise ValueError(f"sites {unknown} are not in the server kit of {kit.project!r} (known: {sorted(kit.sites)})")
        self.spec = spec
        self.store = store
        self.initial_model = initial_model
        self.warm_start = warm_start
        self.selection = selection or SelectionRule()
        self.best = BestRound.start(self.selection)
        self.log = logger or log
        self._work = Path(tempfile.mkdtemp(prefix="flare-run-"))
        self.checkpoints = RunCheckpoints(spec, store, extra_state, self.log)
        self.sites = SiteCommunicator(
            kit, self._work, connect_grace=spec.connect_grace, client_factory=client_factory, logger=self.log
        )
        self.aggregator = make_aggregator(spec.aggregator, spill_dir=self._work / "spill", **spec.aggregator_args)
        self.aggregator = with_central_dp(self.aggregator, spec.central_dp, spill_dir=self._work / "spill")
        # (round, site) -> the privacy filters the site's result says it went through
        self._site_privacy: dict[tuple[int, str], dict[str, Any]] = {}
        # the last round's local models of the sites that allow sharing them (cross-site evaluation)
        self.local_models = SharedLocalModels(store, spec.federation, spec.run_id, self._work, self.log)
        self.in_flight: InFlight | None = None
        self.tracking = RunTracking(spec, store, self.log, mlflow, extra_state)  # curves: store, TensorBoard, MLflow

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
        """Rounds after ``progress`` until ``num_rounds`` (or an early stop), waiting in this process."""
        while not self.finished(progress):
            flight = self.scatter(progress)
            progress = self.finish_round(progress, flight, self.gather(flight))
        return progress

    def restore(self) -> Progress:
        """The newest committed round of this run, or round 0 with the initial model (committed)."""
        spec = self.spec
        restored = self.checkpoints.latest()
        if restored is None:
            weights = self.checkpoints.initial_weights(self.initial_model, self.sites, self.warm_start)
            # Round 0 is the initial model, committed: a retry, or a deferrable run coming back
            # from the triggerer, starts from these very weights instead of asking for new ones.
            uri = self.checkpoints.commit(0, weights, [], {}, self.aggregator.state())
            self.log.info("Starting %s run %s at round 1 (model of %d tensors)", spec.federation, spec.run_id, len(weights))
            return Progress(0, weights, [], uri)
        snapshot, weights = restored
        self.best = BestRound.from_state(self.selection, snapshot.state.get("best"))
        self.aggregator.load_state(self.store.load_server_state(snapshot), snapshot.state.get("aggregator", {}).get("meta", {}))
        self.tracking.resume(snapshot.round)
        self.log.info("Resuming %s run %s after committed round %d (%s)", spec.federation, spec.run_id, snapshot.round, snapshot.uri)
        return Progress(snapshot.round, weights, read_history(snapshot.state.get("history")), snapshot.uri)

    def finalize(self, progress: Progress) -> str:
        """Mark the last round as this run's final model (what warm starts pick up)."""
        uri = self.checkpoints.finalize(progress.round)
        self.tracking.run_finished(progress.round)
        return uri

    def finished(self, progress: Progress) -> bool:
        """All rounds done, or stopped early for want of improvement."""
        return progress.round >= self.spec.num_rounds or self.best.stopped_early

    def best_model(self) -> Progress | None:
        """The best round kept so far with its model (read back from its commit), or None."""
        if self.best.round is None:
            return None
        snapshot = self.store.get_round(self.spec.federation, self.spec.run_id, self.best.round)
        return Progress(snapshot.round, self.store.load_weights(snapshot), read_history(snapshot.state.get("history")), snapshot.uri)

    # ---- a round ----------------------------------------------------------------------

    def scatter(self, progress: Progress) -> InFlight:
        """Send the global weights to every site for round ``progress.round + 1``."""
        spec = self.spec
        number = progress.round + 1
        weights_file = self._spool(progress, number)
        self.aggregator.begin_round(progress.weights, number, spec.sites)
        send_file = self._with_outgoing(progress, weights_file)
        # run_key names the run at the sites: where a trainer keeps its state across rounds.
        extra_config = {**self.aggregator.trainer_config(), "run_key": spec.run_key}
        order = TaskOrder(
            spec.app_name,
            send_file,
            "train",
            spec.trainer_config(number, extra_config),
            spec.app_version,
            spec.num_gpus,
            spec.num_processes,
        )
        now = time.time()
        flight = InFlight(number, {s: spec.task_id(number, s) for s in spec.sites}, now, now + spec.train_timeout)
        self.sites.send(flight, dict.fromkeys(spec.sites, order), lambda site, n: spec.task_id(number, site, f"retrain{n}"))
        weights_file.unlink(missing_ok=True)  # progress.weights keeps it open: readable until dropped
        send_file.unlink(missing_ok=True)
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
        save_for_upload(progress.weights, path)
        progress.weights = TensorFile(path)
        return path

    def _with_outgoing(self, progress: Progress, weights_file: Path) -> Path:
        """The file the sites get: the global model, plus the aggregator's tensors for the
        sites (SCAFFOLD's control variate) in a second file when it has any."""
        extra = self.aggregator.outgoing_tensors()
        if not extra:
            return weights_file
        path = weights_file.with_name(f"send-{weights_file.name}")
        save_for_upload(ChainMap(extra, progress.weights), path)  # read tensor by tensor
        return path

    def rule(self, flight: InFlight) -> GatherRule:
        """When the round stops waiting (the trigger gets the same rule)."""
        return GatherRule(self.spec.min_clients, self.spec.wait_time_after_min_received, flight.deadline)

    def gather(self, flight: InFlight) -> dict[str, TaskState]:
        """Wait for the round's sites per the gather rule, aggregating results as they arrive."""
        return self.sites.gather(flight, self.rule(flight), self._add_update)

    def _add_update(self, site: str, state: TaskState, received: ReceivedResult) -> str | None:
        """Fold one site's result into the aggregate; why it was rejected, or None."""
        path = received.path
        try:
            # The result file says whether it holds full weights or a difference, and which
            # privacy filters the site applied to it.
            metadata = describe_file(path)[1]
            kind = _UPDATE_KIND.get(metadata.get(RESULT_KIND_KEY, "weights"), "unknown")
            self._site_privacy[(state.round, site)] = _privacy_record(metadata)
            if state.round >= self.spec.num_rounds or self.selection.early_stop_rounds is not None:  # maybe the last round
                self.local_models.keep(site, path, metadata)
            # The file is ours to give: an update that waits for its turn is moved, not copied.
            self.aggregator.add(site, path, state.num_samples, kind, move=True, nonfinite=received.nonfinite)
            return None
        except (UpdateRejected, TensorFormatError) as exc:
            self.local_models.discard(site)
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
        for site, report in record.sites.items():
            report.privacy = self._site_privacy.pop((flight.round, site), {})
        if isinstance(self.aggregator, CentralDP):
            record.privacy = dict(self.aggregator.round_privacy)
        improved = self._score(record, weights)
        self.tracking.round_done(record, states)  # before the commit: a retried round writes the same files again
        # The run's last round: the local models the sites allowed to share go to the store before the commit.
        if flight.round >= self.spec.num_rounds or self.best.stopped_early:
            self.local_models.publish(flight.round, accepted, progress.weights)
        else:
            self.local_models.clear()
        history = [*progress.history, record]
        uri = progress.snapshot_uri
        # A new best round is committed whatever snapshot_every says: "best" names a commit.
        if flight.round % self.spec.snapshot_every == 0 or flight.round == self.spec.num_rounds or improved or self.best.stopped_early:
            best = {"best": self.best.to_dict()} if self.selection.enabled else None
            uri = self.checkpoints.commit(flight.round, weights, history, flight.task_ids, self.aggregator.state(), best)
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

    def _score(self, record: RoundRecord, weights: Mapping[str, Any]) -> bool:
        """Have the sites evaluate the round's global model; True when it is the best round so far."""
        if not self.selection.enabled or record.round is None:
            return False
        number = record.round
        path = self._work / f"scored-{number:04d}.safetensors"
        save_file(weights, path, durable=False)
        try:
            evaluation = evaluate_at_sites(self.sites, self.spec, path, number, self.spec.trainer_config(number, {}), self.log)
        finally:
            path.unlink(missing_ok=True)
        record.evaluation = evaluation["global"]
        improved = self.best.observe(self.selection, number, record.evaluation)
        metric, best = self.selection.metric, self.best
        score = record.evaluation.get(metric or "")
        self.log.info(
            "Round %d: global model %s=%s; best round %s (%s=%s)%s",
            number, metric, "not evaluated" if score is None else f"{score:.4f}", best.round, metric,
            "none" if best.value is None else f"{best.value:.4f}",
            f", stopping early: {best.rounds_without_improvement} rounds without improvement" if best.stopped_early
            else f", {best.rounds_without_improvement} rounds without improvement" if not improved else "",
        )
        return improved

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
        """Every site evaluates the global model of ``progress`` on its own data."""
        weights_file = self._work / "final.safetensors"
        save_file(progress.weights, weights_file)
        try:
            return evaluate_at_sites(
                self.sites, self.spec, weights_file, progress.round, self.spec.trainer_config(progress.round, {}), self.log
            )
        finally:
            weights_file.unlink(missing_ok=True)


def _privacy_record(metadata: Mapping[str, str]) -> dict[str, Any]:
    try:
        record = json.loads(metadata.get(RESULT_PRIVACY_KEY) or "{}")
    except ValueError:
        return {"unreadable": True}
    return record if isinstance(record, dict) else {"unreadable": True}


def _reasons(flight: InFlight) -> str:
    return "; ".join(f"{s}: {why}" for s, why in sorted(flight.dropped.items()))


"""A run's committed steps in the snapshot store, and the model it starts from.

Every workflow commits its progress here after each step and restores from here when
a retried task (or a deferrable task coming back from the triggerer) takes the run up
again: the newest committed step wins, a damaged one gives way to the one before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..client import AgentError
from ..files import safe_name
from ..snapshots import Snapshot, SnapshotStore
from ..wire.tensors import load_file
from .communicator import SiteCommunicator, TaskOrder
from .errors import RoundFailed
from .records import RoundRecord, RunSpec
from .selection import best_round_of

log = logging.getLogger(__name__)


class RunCheckpoints:
    """The committed rounds of one run (``spec.federation``, ``spec.run_id``).

    :param extra_state: added to every committed state (e.g. the Airflow DAG, task and run).
    """

    def __init__(self, spec: RunSpec, store: SnapshotStore, extra_state: Mapping[str, Any] | None = None,
                 logger: logging.Logger | None = None):
        self.spec = spec
        self.store = store
        self.extra_state = dict(extra_state or {})
        self.log = logger or log

    def latest(self) -> tuple[Snapshot, dict[str, np.ndarray]] | None:
        """The newest usable committed round and its model, or None before the first commit."""
        restored = self.store.restore(self.spec.federation, self.spec.run_id)
        if restored is not None:
            snapshot = restored[0]
            if snapshot.state.get("config_hash") != self.spec.config_hash:
                self.log.warning(
                    "The run's configuration changed since round %d was committed (config hash %s, now %s); going on with the new one",
                    snapshot.round,
                    snapshot.state.get("config_hash"),
                    self.spec.config_hash,
                )
        return restored

    def commit(
        self,
        number: int,
        weights: Mapping[str, np.ndarray] | Path,
        history: list[RoundRecord],
        task_ids: Mapping[str, str],
        aggregator_state: tuple[Mapping[str, np.ndarray], Mapping[str, Any]],
        workflow_state: Mapping[str, Any] | None = None,
    ) -> str:
        """Commit round ``number`` with the run's full state; returns its snapshot URI.

        ``weights`` may also be a safetensors file (committed without loading it);
        ``workflow_state`` is what the workflow itself must find again on resume (the best
        round so far, a cyclic run's plan).
        """
        tensors, meta = aggregator_state
        spec = self.spec
        state = {
            "federation": spec.federation,
            "run": spec.run_id,
            "round": number,
            "num_rounds": spec.num_rounds,
            "app": {"name": spec.app_name, "version": spec.app_version},
            "aggregator": {"name": spec.aggregator, "args": dict(spec.aggregator_args), "meta": dict(meta)},
            "config_hash": spec.config_hash,
            "task_ids": dict(task_ids),
            "history": [record.to_dict() for record in history],
            **dict(workflow_state or {}),
            **self.extra_state,
        }
        return self.store.commit_round(spec.federation, spec.run_id, number, weights, state, state_tensors=tensors)

    def finalize(self, round_number: int) -> str:
        """Mark ``round_number`` as this run's final model (what warm starts pick up)."""
        return self.store.mark_final(self.spec.federation, self.spec.run_id, round_number)

    def round_uri(self, number: int) -> str:
        """The URI of this run's committed round ``number`` (checked, not downloaded)."""
        return self.store.get_round(self.spec.federation, self.spec.run_id, number).uri

    def initial_weights(self, source: str | None, sites: SiteCommunicator, warm_start: str = "last") -> dict[str, np.ndarray]:
        """The model of round 0: a file or URI, ``"previous"`` (warm start), or None (a site builds it).

        A warm start takes the latest finished run's last round, or with ``warm_start="best"``
        the best round that run kept (its last round where it kept none).
        """
        if source == "previous":
            final = self.store.find_final(self.spec.federation)
            if final is None:
                self.log.info("No earlier finished run of %s to warm-start from; initialising from the app", self.spec.federation)
                return self._weights_from_site(sites)
            which = "final"
            if warm_start == "best":
                best = best_round_of(final.state)
                if best is None:
                    self.log.warning("Run %s kept no best round (it had no best_metric); warm start from its last round", final.run)
                else:
                    final, which = self.store.get_round(self.spec.federation, final.run, best), "best"
            self.log.info("Warm start from the %s model of run %s (round %d, %s)", which, final.run, final.round, final.uri)
            return self.store.load_weights(final)
        if source:
            return self.store.load_initial_weights(source)
        return self._weights_from_site(sites)

    def _weights_from_site(self, sites: SiteCommunicator) -> dict[str, np.ndarray]:
        """Ask one site to build the app's initial model (the Airflow side has no PyTorch)."""
        spec = self.spec
        order = TaskOrder(spec.app_name, None, "initialize", {"seed_round": 0}, spec.app_version)
        errors = {}
        for site in sorted(spec.sites):
            task_id = spec.task_id(0, site, "initialize")
            try:
                state = sites.run_to_end(site, task_id, order, spec.train_timeout)
                path: Path = sites.work_dir / f"init-{safe_name(site)}.safetensors"
                sites.client(site).fetch_result(task_id, path)
                weights = load_file(path)
                sites.client(site).acknowledge(task_id)
                self.log.info("Initial model from site %s (%d tensors, %s)", site, len(weights), state.status)
                return weights
            except (AgentError, RoundFailed) as exc:
                errors[site] = str(exc)
        raise RoundFailed(f"no site could initialise the model: {errors}")

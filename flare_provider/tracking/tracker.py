"""What a workflow does with the curves of each round: store them, write TensorBoard, log to MLflow.

The engines call :meth:`RunTracking.resume` after restoring, :meth:`RunTracking.round_done`
once a round (a hop of a cyclic run) is aggregated and before it is committed, and
:meth:`RunTracking.run_finished` when the run's final model is marked. Tracking never
fails a round: a store, writer or tracking server that refuses is logged as a warning and
the run goes on (the round's model and state are what the run depends on).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..federation.records import RoundRecord, RunSpec
from ..snapshots import SnapshotStore
from ..wire.task_state import TaskState
from .curves import RoundCurves, round_curves, save_curves, step_bases_after
from .mlflow_client import MlflowError, MlflowSettings
from .run_files import RunFiles
from .tensorboard import GLOBAL_RUN, global_scalars, site_run_name, site_scalars, write_round

log = logging.getLogger(__name__)


class RunTracking:
    """The curves of one run: in the store and as TensorBoard event files (always), MLflow (when configured)."""

    def __init__(self, spec: RunSpec, store: SnapshotStore, logger: logging.Logger | None = None,
                 mlflow: MlflowSettings | None = None, extra_state: Mapping[str, Any] | None = None):
        self.spec = spec
        self.store = store
        self.log = logger or log
        self.files = RunFiles(store, spec.federation, spec.run_id)
        self.bases: dict[str, int] = {}  # site -> where its steps go on in the next round
        self.mlflow = None
        if mlflow is not None:
            from .mlflow_runs import MlflowRunLog

            airflow = (extra_state or {}).get("airflow") or {}  # the DAG, task and run, as tags of the MLflow run
            self.mlflow = MlflowRunLog(mlflow, spec, {f"airflow_{k}": str(v) for k, v in airflow.items()})

    def resume(self, committed_round: int) -> None:
        """Carry on the sites' step axes after the committed round a run restarts from."""
        try:
            self.bases = step_bases_after(self.files, committed_round) if committed_round > 0 else {}
        except Exception as exc:  # the store's own errors, or a damaged file
            self.log.warning("Training curves: cannot read where the steps of round %d ended (%s); steps start again at 0",
                             committed_round, exc)
            self.bases = {}

    def round_done(self, record: RoundRecord, states: Mapping[str, TaskState]) -> RoundCurves | None:
        """Keep round ``record.round``'s curves: store file, TensorBoard event files, MLflow metrics."""
        if record.round is None:
            return None
        number = record.round
        curves = round_curves(number, {site: state for site, state in states.items() if site in record.sites}, self.bases)
        self.bases = dict(curves.next_step_base)
        try:
            save_curves(self.files, curves)
        except Exception as exc:
            self.log.warning("Training curves of round %d not stored: %s", number, exc)
        self._write_tensorboard(curves, record)
        if self.mlflow is not None:
            try:
                if self.mlflow.log_round(curves, record.metrics, record.evaluation, record.num_samples or 0, len(record.accepted)):
                    self.log.info("Round %d logged to MLflow run %s", number, self.mlflow.parent_id)
            except MlflowError as exc:
                self.log.warning("Round %d not logged to MLflow: %s", number, exc)
        return curves

    def _write_tensorboard(self, curves: RoundCurves, record: RoundRecord) -> None:
        runs = {site_run_name(site): site_scalars(curves, site) for site in curves.sites}
        runs[GLOBAL_RUN] = global_scalars(curves.round, record.metrics, record.evaluation, record.num_samples or 0,
                                          len(record.accepted))
        try:
            write_round(self.files, curves.round, runs)
        except Exception as exc:
            self.log.warning("TensorBoard event files of round %d not written: %s", curves.round, exc)

    @property
    def tensorboard_uri(self) -> str:
        return self.files.uri("tensorboard")

    def run_finished(self, final_round: int) -> None:
        """The run is over: the final model goes to MLflow and its runs end."""
        if self.mlflow is None:
            return
        try:
            with tempfile.TemporaryDirectory(prefix="flare-mlflow-") as scratch:
                model = None
                if final_round > 0:
                    snapshot = self.store.get_round(self.spec.federation, self.spec.run_id, final_round)
                    model = self.store.download_weights(snapshot, Path(scratch) / "model.safetensors")
                self.mlflow.finish(model)
            self.log.info("MLflow run %s finished with the model of round %d", self.mlflow.parent_id, final_round)
        except MlflowError as exc:
            self.log.warning("The final model was not logged to MLflow: %s", exc)

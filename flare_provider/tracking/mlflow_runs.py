"""A federated run in MLflow: one run for the whole (DAG) run, a child run per site.

- the parent holds the run's settings as parameters, the round's metrics over the sites
  (weighted by samples) and the global model's evaluation by round, and at the end the
  final model as the artifact ``model/model.safetensors``;
- each site's child run (tag ``mlflow.parentRunId``) holds the site's streamed metrics by
  step (on the run-wide step axis, see :mod:`.curves`) and its round results as
  ``round/<metric>`` by round.

Runs are found again by their tags (``flare_run_key``, ``flare_site``), so a retried
Airflow task or the next deferral logs into the same runs; the parent's
``flare_logged_round`` tag says which rounds are in already, so none is logged twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..federation.records import RunSpec
from .curves import RoundCurves
from .mlflow_client import MlflowClient, MlflowSettings
from .tensorboard import global_scalars, site_scalars

log = logging.getLogger(__name__)

RUN_KEY_TAG, SITE_TAG, ROLE_TAG, LOGGED_TAG = "flare_run_key", "flare_site", "flare_role", "flare_logged_round"
PARENT_TAG = "mlflow.parentRunId"
MODEL_ARTIFACT = "model/model.safetensors"


def run_params(spec: RunSpec) -> dict[str, str]:
    """The run's settings as MLflow parameters (mappings as JSON)."""
    params = {}
    for name, value in asdict(spec).items():
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value, sort_keys=True, default=str)
        params[name] = "" if value is None else str(value)
    return params


class MlflowRunLog:
    """The MLflow runs of one federated run; created on first use."""

    def __init__(self, settings: MlflowSettings, spec: RunSpec, tags: Mapping[str, str] | None = None,
                 client: MlflowClient | None = None):
        self.spec = spec
        self.client = client or MlflowClient(settings)
        self.experiment = settings.experiment or spec.federation
        self.tags = dict(tags or {})
        self._experiment_id: str | None = None
        self._parent: dict[str, Any] | None = None
        self._children: dict[str, str] = {}

    @property
    def parent(self) -> dict[str, Any]:
        if self._parent is None:
            self._experiment_id = self.client.experiment_id(self.experiment)
            tags = {RUN_KEY_TAG: self.spec.run_key, ROLE_TAG: "run"}
            found = self.client.find_run(self._experiment_id, tags)
            if found is None:
                found = self.client.create_run(self._experiment_id, f"{self.spec.federation} {self.spec.run_id}",
                                               {**tags, "flare_federation": self.spec.federation,
                                                "flare_run_id": self.spec.run_id, **self.tags})
                self.client.log_batch(found["info"]["run_id"], params=run_params(self.spec))
            self._parent = found
        return self._parent

    @property
    def parent_id(self) -> str:
        return self.parent["info"]["run_id"]

    def child_id(self, site: str) -> str:
        if site not in self._children:
            tags = {RUN_KEY_TAG: self.spec.run_key, SITE_TAG: site}
            parent_id = self.parent_id
            found = self.client.find_run(self._experiment_id or "", tags)
            if found is None:
                found = self.client.create_run(self._experiment_id or "", site, {**tags, ROLE_TAG: "site", PARENT_TAG: parent_id})
                self.client.log_batch(found["info"]["run_id"], params={"site": site})
            self._children[site] = found["info"]["run_id"]
        return self._children[site]

    def logged_round(self) -> int:
        """The last round logged, by this process or an earlier try (the parent's tag)."""
        tags = {t["key"]: t["value"] for t in self.client.get_run(self.parent_id)["data"].get("tags", [])}
        try:
            return int(tags.get(LOGGED_TAG, "0"))
        except ValueError:
            return 0

    def log_round(self, curves: RoundCurves, metrics: Mapping[str, float], evaluation: Mapping[str, float] | None,
                  num_samples: int, sites: int) -> bool:
        """Round ``curves.round``'s metrics, in the parent and each site's child; False when it was logged already."""
        if curves.round <= self.logged_round():
            return False
        for site in sorted(curves.sites):
            self.client.log_batch(self.child_id(site), metrics=site_scalars(curves, site))
        self.client.log_batch(self.parent_id, metrics=global_scalars(curves.round, metrics, evaluation, num_samples, sites))
        self.client.set_tag(self.parent_id, LOGGED_TAG, str(curves.round))
        return True

    def finish(self, model_file: Path | None) -> None:
        """Upload the final model to the parent run and end every run of this federated run."""
        if model_file is not None:
            self.client.upload_artifact(self.client.get_run(self.parent_id), MODEL_ARTIFACT, model_file)
        for site in self.spec.sites:
            if site in self._children or self.client.find_run(self._experiment_id or "", {RUN_KEY_TAG: self.spec.run_key, SITE_TAG: site}):
                self.client.finish_run(self.child_id(site))
        self.client.finish_run(self.parent_id)

"""A global model evaluated by the sites on their own data: after a run, and after each
round where the run keeps its best round.

The task ids are derived from (run, step, site) with the kind ``evaluate``, so evaluating
the same step again (a resumed run, the final evaluation of a round already scored)
re-attaches to the sites' finished tasks instead of running them again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .communicator import SiteCommunicator, TaskOrder, for_each_site
from .records import RunSpec, SiteRound, weighted_metrics


def evaluate_at_sites(
    sites: SiteCommunicator,
    spec: RunSpec,
    weights_file: Path,
    step: int,
    config: Mapping[str, Any],
    log: logging.Logger,
) -> dict[str, Any]:
    """Every site of ``spec`` evaluates the model in ``weights_file``.

    Returns ``{"sites": {site: {"num_samples", "metrics"} or {"error"}}, "global": metrics}``,
    ``global`` being the sample-weighted mean over the sites that answered. A site that
    cannot evaluate is logged and left out, never fails the caller.
    """
    order = TaskOrder(spec.app_name, weights_file, "evaluate", dict(config), spec.app_version)

    def one(site: str) -> SiteRound:
        task_id = spec.task_id(step, site, "evaluate")
        state = sites.run_to_end(site, task_id, order, spec.train_timeout)
        if state.result_available:
            sites.client(site).acknowledge(task_id)
        return SiteRound(state.status, task_id, state.num_samples, dict(state.metrics))

    per_site: dict[str, dict[str, Any]] = {}
    reported: dict[str, SiteRound] = {}
    for site, outcome in for_each_site(one, spec.sites).items():
        if isinstance(outcome, BaseException):
            log.warning("Evaluation of the model of step %d on site %s failed: %s", step, site, outcome)
            per_site[site] = {"error": str(outcome)}
        else:
            reported[site] = outcome
            per_site[site] = {"num_samples": outcome.num_samples, "metrics": outcome.metrics}
    return {"sites": per_site, "global": weighted_metrics(reported)}

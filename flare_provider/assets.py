"""The federation's global model as an Airflow Asset.

The training operators declare it as an outlet, so that a DAG scheduled on it runs each
time a run commits a new final model. The asset event's ``extra`` says which model:

- ``federation``, ``run_id``, ``round``: where the run's rounds live in the snapshot store;
- ``model_uri`` and ``digest`` (the SHA-256 of ``model.safetensors`` as committed);
- ``metrics``: the final round's metrics and, after the final evaluation, the global
  evaluation metrics under ``evaluation``;
- ``data_versions``: each site's data version when the run finished (``docs/assets.md``).

Plain data and the Airflow SDK only: DAG files import this module to name the asset.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.sdk import Asset

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator

MODEL_GROUP = "model"
NAME_PREFIX = "flare-model/"


def model_asset(federation: str, snapshot_uri: str | None = None) -> Asset:
    """The Asset of ``federation``'s global model in the store at ``snapshot_uri``.

    Its URI is the federation's folder in the store (``<snapshot_uri>/<federation>``;
    default store: ``$FLARE_SNAPSHOT_URI``, else ``file://$AIRFLOW_HOME/flare-snapshots``),
    its name ``flare-model/<federation>``. A DAG that consumes the model names it the same
    way as the training DAG does: ``schedule=[model_asset("train_federation")]``.
    """
    from flare_provider.hooks.snapshots import SNAPSHOT_SCHEMES, default_snapshot_uri

    if not isinstance(federation, str) or not federation.strip():
        raise ValueError(f"federation must be a non-empty name, got {federation!r}")
    root = snapshot_uri or default_snapshot_uri()
    if not isinstance(root, str) or not root.startswith(SNAPSHOT_SCHEMES):
        raise ValueError(f"snapshot_uri must be s3://bucket/prefix or file:///path, got {root!r}")
    return Asset(name=NAME_PREFIX + federation, uri=f"{root.rstrip('/')}/{quote(federation, safe='')}", group=MODEL_GROUP)


def declare_model_outlet(operator: "BaseOperator", given: Asset | None) -> Asset | None:
    """Add the operator's model Asset to its outlets and return it.

    ``given`` is the ``model_asset=`` argument; without one the asset is derived from the
    operator's ``federation`` (default: the DAG id) and ``snapshot_uri``. Where either is a
    template, nothing is known until the task runs: no asset is declared then (pass
    ``model_asset=`` to declare one).
    """
    from flare_provider.operators.arguments import is_template

    if given is not None and not isinstance(given, Asset):
        raise ValueError(f"model_asset must be an airflow.sdk.Asset, got {type(given).__name__}")
    asset = given
    if asset is None:
        federation = operator.federation or (operator.dag_id if operator.has_dag() else None)
        if not federation or is_template(federation) or is_template(operator.snapshot_uri):
            return None
        asset = model_asset(federation, operator.snapshot_uri)
    if asset not in operator.outlets:
        operator.outlets = [*operator.outlets, asset]
    return asset


def output_round(result: dict[str, Any]) -> int:
    """The round (scatter-gather) or hop (cyclic) whose model a training task's result names."""
    if "last" in result:
        chosen = result["best"] if result.get("output_model") == "best" and result.get("best") else result["last"]
        return int(chosen["round"])
    return int(result["hops_done"])


def finite_numbers(metrics: Any) -> dict[str, Any]:
    """``metrics`` with only finite numbers kept (an asset event's extra is strict JSON)."""
    kept: dict[str, Any] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, dict):
            kept[str(name)] = finite_numbers(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            kept[str(name)] = value
    return kept


def model_event_extra(result: dict[str, Any], digest: str, data_versions: dict[str, str]) -> dict[str, Any]:
    """The asset event's extra for a finished training task's ``result``."""
    metrics = finite_numbers(result.get("final_metrics"))
    evaluation = (result.get("evaluation") or {}).get("global")
    if evaluation:
        metrics["evaluation"] = finite_numbers(evaluation)
    return {
        "federation": result["federation"],
        "run_id": result["run_id"],
        "round": output_round(result),
        "model_uri": result["model_uri"],
        "digest": digest,
        "metrics": metrics,
        "data_versions": dict(data_versions),
    }


def sites_data_versions(kit: Any, sites: list[str], timeout: float = 5.0) -> dict[str, str]:
    """Each site's data version as its agent reports it now ("" where unknown or unreachable)."""
    statuses = kit.site_statuses(timeout=timeout, sites=list(sites))
    return {site: getattr(status, "data_version", "") or "" for site, status in statuses.items()}


def record_model(operator: Any, run: Any, result: dict[str, Any]) -> dict[str, Any]:
    """Fill in the model Asset's event for this task and remember what lineage reports.

    Called by a training operator once its run is final; returns the event's extra (also
    put in ``result["model_asset"]``, without the metrics the result has already).
    """
    from airflow.sdk import get_current_context

    from flare_provider.hooks.flare import FlareHook
    from flare_provider.snapshots.layout import MODEL_FILE

    spec = run.spec
    snapshot = run.store.get_round(spec.federation, spec.run_id, output_round(result))
    digest = snapshot.files[MODEL_FILE]["sha256"]
    kit = FlareHook(operator.flare_conn_id).get_kit()
    data_versions = sites_data_versions(kit, list(spec.sites))
    extra = model_event_extra(result, digest, data_versions)
    operator.lineage_record = {"project": kit.project, "sites": list(spec.sites), "data_versions": data_versions,
                               "model_uri": result["model_uri"], "digest": digest}
    asset = getattr(operator, "model_asset", None)
    if asset is not None:
        get_current_context()["outlet_events"][asset].extra = extra
        result["model_asset"] = {"name": asset.name, "uri": asset.uri, "digest": digest, "data_versions": data_versions}
    return extra


def site_data_asset(flare_conn_id: str = "flare_default", min_sites: int = 1, *, sites: list[str] | None = None,
                    poll_interval: float = 60.0, name: str | None = None) -> Asset:
    """An Asset with an event each time ``min_sites`` sites or more have new training data.

    Schedule a DAG on it (``schedule=[site_data_asset("flare_default", 2)]``) to retrain when
    the data changes; its watcher runs a
    :class:`~flare_provider.triggers.data_version.DataVersionTrigger` in the triggerer. The
    event's ``extra["payload"]`` says which sites changed from which version to which.
    """
    from airflow.sdk import AssetWatcher

    from flare_provider.triggers.data_version import DataVersionTrigger

    trigger = DataVersionTrigger(flare_conn_id=flare_conn_id, min_sites=min_sites, sites=sites, poll_interval=poll_interval)
    asset_name = name or f"flare-data/{flare_conn_id}"
    return Asset(name=asset_name, uri=f"flare://{quote(flare_conn_id, safe='')}/data", group="dataset",
                 watchers=[AssetWatcher(name=f"{asset_name}-versions".replace("/", "-"), trigger=trigger)])

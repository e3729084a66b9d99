"""OpenLineage facets of the training operators: the sites' datasets in, the model out.

Airflow's OpenLineage provider calls an operator's ``get_openlineage_facets_on_start`` and
``..._on_complete``; the training operators answer with :func:`facets_on_start` and
:func:`facets_on_complete`. Everything of OpenLineage is imported here, in the functions,
so the provider stays optional: without it these return None and nothing else changes.

Naming (docs/assets.md):

- a site's data: namespace ``flare://<project>``, name ``<site>/data``, version (the
  ``version`` dataset facet) its data version as the agent reported it when the run ended;
- the model: namespace and name from its URI as OpenLineage names object stores and files
  (``s3://bucket`` + key; ``file`` + path), version the SHA-256 of ``model.safetensors``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit


def openlineage_available() -> bool:
    try:
        import airflow.providers.openlineage.extractors  # noqa: F401
        import openlineage.client.event_v2  # noqa: F401
    except ImportError:
        return False
    return True


def site_dataset_name(project: str, site: str) -> tuple[str, str]:
    """The (namespace, name) of ``site``'s training data."""
    return f"flare://{project}", f"{site}/data"


def model_dataset_name(model_uri: str) -> tuple[str, str]:
    """The (namespace, name) of the model file at ``model_uri`` (``s3://`` or ``file://``)."""
    parts = urlsplit(model_uri)
    if parts.scheme == "s3":
        return f"s3://{parts.netloc}", parts.path.lstrip("/")
    if parts.scheme == "file":  # the path on disk (file URIs escape it)
        return "file", unquote(parts.path)
    raise ValueError(f"model URI must be s3:// or file://, got {model_uri!r}")


def _datasets(project: str, sites: list[str], data_versions: dict[str, str], model_uri: str | None, digest: str | None):
    from airflow.providers.openlineage.extractors import OperatorLineage
    from openlineage.client.event_v2 import InputDataset, OutputDataset
    from openlineage.client.facet_v2 import dataset_version_dataset

    def version(value: str | None) -> dict[str, Any]:
        return {"version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=value)} if value else {}

    inputs = [InputDataset(*site_dataset_name(project, site), facets=version(data_versions.get(site)))
              for site in sites]
    outputs = [OutputDataset(*model_dataset_name(model_uri), facets=version(digest))] if model_uri else []
    return OperatorLineage(inputs=inputs, outputs=outputs)


def facets_on_start(operator: Any) -> Any:
    """The sites the task trains on (no versions yet); the model is not known before the run."""
    if not openlineage_available():
        return None
    from flare_provider.hooks.flare import FlareHook

    kit = FlareHook(operator.flare_conn_id).get_kit()
    sites = list(operator.sites) if isinstance(operator.sites, list) else sorted(kit.sites)
    return _datasets(kit.project, sites, {}, None, None)


def facets_on_complete(operator: Any) -> Any:
    """The sites' datasets at the versions they trained on, and the model the task produced."""
    if not openlineage_available():
        return None
    record = getattr(operator, "lineage_record", None)
    if not record:  # the task did not get to the end of its run
        return facets_on_start(operator)
    return _datasets(record["project"], record["sites"], record["data_versions"], record["model_uri"], record["digest"])

"""The training operators' OpenLineage facets, with the OpenLineage provider and without it.

The facets of a real run are checked in ``test_assets_airflow.py`` (the provider's
listener writing its events to a file); here the operator's methods are called as the
provider's extractor calls them, against real agents, and in an interpreter where the
provider cannot be imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from airflow.providers.openlineage.extractors import OperatorLineage

from flare_provider.lineage import model_dataset_name, site_dataset_name
from flare_provider.operators import CyclicOperator, ScatterGatherOperator


def test_on_start_names_the_sites_data_and_on_complete_adds_versions_and_the_model(sites):
    op = ScatterGatherOperator(task_id="train", app_name="digits", flare_conn_id=sites.conn_id)
    project = json.loads(sites.connection_json())["extra"]["project"]
    start = op.get_openlineage_facets_on_start()
    assert isinstance(start, OperatorLineage) and start.outputs == []
    assert [(d.namespace, d.name, d.facets) for d in start.inputs] == [
        (f"flare://{project}", f"{site}/data", {}) for site in sorted(sites.sites)]

    # What record_model keeps once a run is final (the sites' versions, the model and its digest).
    op.lineage_record = {"project": project, "sites": list(sites.sites), "data_versions": {"site-1": "v1", "site-2": ""},
                         "model_uri": "s3://models/fed/run/round_00003/model.safetensors", "digest": "ab" * 32}
    done = op.get_openlineage_facets_on_complete(task_instance=None)
    versions = {d.name: d.facets.get("version") for d in done.inputs}
    assert versions["site-1/data"].datasetVersion == "v1" and versions["site-2/data"] is None
    (model,) = done.outputs
    assert (model.namespace, model.name, model.facets["version"].datasetVersion) == (
        "s3://models", "fed/run/round_00003/model.safetensors", "ab" * 32)


def test_dataset_names():
    assert site_dataset_name("hospitals", "site-a") == ("flare://hospitals", "site-a/data")
    assert model_dataset_name("file:///snap/fed/manual__2026%253A01/round_00001/model.safetensors") == (
        "file", "/snap/fed/manual__2026%3A01/round_00001/model.safetensors")


# An interpreter where OpenLineage cannot be imported (the client library, and the provider's
# extractors; the provider's metadata stays, as the package's entry point lists it here):
# the operators import and answer None.
WITHOUT_PROVIDER = """
import importlib.abc, json, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "openlineage" or name.startswith(("openlineage.", "airflow.providers.openlineage.extractors")):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NotInstalled())
from flare_provider.operators import CyclicOperator, ScatterGatherOperator
ops = [ScatterGatherOperator(task_id="a", app_name="x"), CyclicOperator(task_id="b", app_name="x")]
print(json.dumps([[op.get_openlineage_facets_on_start(), op.get_openlineage_facets_on_complete(None)] for op in ops]))
"""


def test_without_the_provider_there_are_no_facets_and_nothing_breaks():
    out = subprocess.run([sys.executable, "-c", WITHOUT_PROVIDER], capture_output=True, text=True, timeout=120,
                         env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[None, None], [None, None]]


def test_cyclic_operator_reports_the_same_way(sites):
    op = CyclicOperator(task_id="cycle", app_name="digits", flare_conn_id=sites.conn_id, sites=[sites.sites[1]])
    start = op.get_openlineage_facets_on_start()
    assert [d.name for d in start.inputs] == [f"{sites.sites[1]}/data"]

"""Provision a federation: one signed startup kit per participant of a ``project.yml``.

``ProvisionOperator`` is ``flare provision`` as a task: it reads the project file
(NVIDIA FLARE's format) and writes ``<workspace>/<project>/prod_NN/<participant>/`` kits
and a zip of each. The project's root CA is created on the first run and kept in the
workspace's ``state/``, so later runs (and ``add_sites``) reuse it; keep that folder safe.
The task's XCom is a secret-free summary: the ``prod_NN`` folder, the root CA fingerprint
and where each kit is.

Params (the trigger form) default to ``FLARE_PROJECT_FILE`` (else this repository's
``examples/project.yml``) and ``FLARE_WORKSPACE`` (else ``$AIRFLOW_HOME/flare-workspace``).
Then hand each site its kit, import the server kit's ``startup/connections.json`` with
``airflow connections import`` and run ``train_federation``. To protect the packages,
add ``package_password="{{ conn.<id>.password }}"`` with a connection holding it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param

from flare_provider.operators import ProvisionOperator

REPO = Path(__file__).resolve().parent.parent
PROJECT_FILE = os.environ.get("FLARE_PROJECT_FILE") or str(REPO / "examples" / "project.yml")
AIRFLOW_HOME = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
WORKSPACE = os.environ.get("FLARE_WORKSPACE") or os.path.join(AIRFLOW_HOME, "flare-workspace")

with DAG(
    dag_id="provision_federation",
    description="project.yml to signed startup kits",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # two runs at once would race for the next prod_NN
    params={
        "project_file": Param(
            PROJECT_FILE, type="string", minLength=1, title="Project file", description="Path to project.yml."
        ),
        "workspace": Param(
            WORKSPACE, type="string", minLength=1, title="Workspace", description="Folder the kits and CA state go to."
        ),
        "add_sites": Param(
            [],
            type="array",
            items={"type": "string"},
            title="Add sites",
            description="Sites to issue on their own, keeping every other kit; empty: provision everything.",
        ),
    },
    render_template_as_native_obj=True,  # add_sites reaches the operator as a list
    doc_md=__doc__,
    tags=["federated-learning", "example"],
) as dag:
    ProvisionOperator(
        task_id="provision",
        project_file="{{ params.project_file }}",
        workspace="{{ params.workspace }}",
        add_sites="{{ params.add_sites }}",
    )

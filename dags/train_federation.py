"""Federated training, triggered by hand: wait for the sites, deploy the app, run the rounds.

``sites_ready`` waits until the sites' agents answer over mutual TLS, ``deploy`` signs the
app (the digits example unless ``FLARE_APP_DIR`` says otherwise) with the server identity
and deploys it, and ``train`` runs the rounds: each round scatters the global model,
every site trains on its own data, the updates are aggregated (FedAvg by default) and the
new model is committed to the snapshot store. After the last round every site evaluates
the final model; the ``train`` task's XCom holds the model's URI and that ``evaluation``
(per site and weighted global), never the weights. ``cross_site_eval`` then has every site
score the global model and the local models of the sites that share theirs
(``share_local_model: true`` in their ``local/site.yaml``): the matrix is stored with the
run and drawn on the Federation page (docs/cross_site_eval.md).

Trigger it from the UI (the form asks for ``rounds``, ``min_clients`` and ``aggregator``)
or the REST API with ``{"conf": {"rounds": 5}}``. The connection, app and snapshot store
come from ``FLARE_CONN_ID``, ``FLARE_APP_DIR`` and ``FLARE_SNAPSHOT_URI`` (see
``federation_tasks.py``).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG
from federation_tasks import APP_NAME, CONN_ID, TRAINING_PARAMS, training_tasks

from flare_provider.operators import CrossSiteEvalOperator

with DAG(
    dag_id="train_federation",
    description="Wait for the sites, deploy the app, run federated rounds, evaluate across sites",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params=TRAINING_PARAMS,
    render_template_as_native_obj=True,
    doc_md=__doc__,
    tags=["federated-learning", "example"],
) as dag:
    training_tasks() >> CrossSiteEvalOperator(task_id="cross_site_eval", app_name=APP_NAME, flare_conn_id=CONN_ID)

"""Weekly federated retraining, warm-started from last week's model.

The same tasks as ``train_federation`` (wait for the sites, deploy the app, run the
rounds, evaluate) on a weekly schedule. Each run starts from the final model of the
latest finished run of this DAG (``initial_model="previous"``), so the sites' fresh data
refines the model instead of training it from scratch; the first run starts from the
app's initial model. While the sites train, ``train`` waits in the triggerer
(``deferrable=True``) and holds no worker slot. Missed weeks are not caught up, and one
run at a time keeps "the previous run" well defined.

Unpause it to start; it runs once for the latest week, then every week. The params and
environment settings are those of ``train_federation``.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG
from federation_tasks import TRAINING_PARAMS, training_tasks

with DAG(
    dag_id="recurring_federation",
    description="Weekly federated retraining, warm-started from the previous run's final model",
    schedule="@weekly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=TRAINING_PARAMS,
    render_template_as_native_obj=True,
    doc_md=__doc__,
    tags=["federated-learning", "example"],
) as dag:
    training_tasks(initial_model="previous", deferrable=True)

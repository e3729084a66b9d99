"""Federated retraining when the sites' data changes, warm-started from the last model.

Each site's agent reports a data version: ``data_version`` in its ``local/site.yaml``
(set by whatever refreshes the site's data), else a digest of its data folder's listing
(file names, sizes, modification times). The schedule is an Asset with an ``AssetWatcher``:
a ``DataVersionTrigger`` in the triggerer asks the sites for their status every
``FLARE_DATA_POLL_INTERVAL`` seconds (default 60) and raises an Asset event once the data
version has changed at ``FLARE_RETRAIN_MIN_SITES`` sites (default 2) since the last event.
Each event starts a run of the training tasks of ``train_federation`` (wait for the sites,
deploy the app, run the rounds, evaluate), starting from the final model of the previous
run of this DAG; ``train`` waits in the triggerer while the sites train. The run's
``triggering_asset_events`` say which sites changed from which version to which.

To retrain on a calendar as well, use ``schedule=AssetOrTimeSchedule(timetable=
CronTriggerTimetable("0 0 * * 0", timezone="UTC"), assets=NEW_DATA)``. The connection, app and snapshot store come
from ``FLARE_CONN_ID``, ``FLARE_APP_DIR`` and ``FLARE_SNAPSHOT_URI`` (see
``federation_tasks.py``); docs/assets.md explains the trigger.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG
from federation_tasks import CONN_ID, TRAINING_PARAMS, training_tasks

from flare_provider.assets import site_data_asset

NEW_DATA = site_data_asset(
    CONN_ID,
    min_sites=int(os.environ.get("FLARE_RETRAIN_MIN_SITES") or 2),
    poll_interval=float(os.environ.get("FLARE_DATA_POLL_INTERVAL") or 60),
)

with DAG(
    dag_id="retrain_on_data",
    description="Federated retraining when enough sites report new data",
    schedule=[NEW_DATA],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=TRAINING_PARAMS,
    render_template_as_native_obj=True,
    doc_md=__doc__,
    tags=["federated-learning", "example"],
) as dag:
    training_tasks(initial_model="previous", deferrable=True)

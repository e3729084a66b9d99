"""Publish each new global model once a person approves it.

Scheduled on the model Asset of the training DAG (``train_federation`` unless
``FLARE_PUBLISH_FEDERATION`` names another federation), this DAG runs each time a training
run commits its final model. ``evaluate`` reads the model the asset event names, checks its
SHA-256 against the snapshot store, and sums up for the approver what the run reported:
the final round's metrics, the sites' evaluation of the final model, the sites' data
versions, the cross-site matrix where the run has one, and the model published now.
``approve`` (Airflow's human-in-the-loop ``ApprovalOperator``) shows that summary in the
UI's Required Actions and waits for Approve or Reject. On Approve, ``publish`` copies the
model to ``FLARE_PUBLISH_URI`` (default ``<snapshot store>/published``) as
``<federation>/model.safetensors`` with a ``model.json`` saying which run, round, digest
and metrics it is, and emits the ``flare-published/<federation>`` Asset for whatever
deploys models; on Reject, nothing is published.

The snapshot store is ``FLARE_SNAPSHOT_URI`` (and ``FLARE_AWS_CONN_ID`` for ``s3://``), as
for the training DAGs. See docs/assets.md.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import DAG, Asset, task

from flare_provider.assets import model_asset

FEDERATION = os.environ.get("FLARE_PUBLISH_FEDERATION") or "train_federation"
SNAPSHOT_URI = os.environ.get("FLARE_SNAPSHOT_URI") or None
AWS_CONN_ID = os.environ.get("FLARE_AWS_CONN_ID") or None
MODEL = model_asset(FEDERATION, SNAPSHOT_URI)
PUBLISH_URI = os.environ.get("FLARE_PUBLISH_URI") or f"{MODEL.uri.rsplit('/', 1)[0]}/published"
PUBLISHED = Asset(name=f"flare-published/{FEDERATION}", uri=f"{PUBLISH_URI.rstrip('/')}/{FEDERATION}", group="model")

with DAG(
    dag_id="publish_model",
    description="Evaluate each new global model and publish it once approved",
    schedule=[MODEL],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["federated-learning", "example"],
) as dag:

    @task
    def evaluate(*, triggering_asset_events=None) -> dict:
        """The model of the newest event, checked against the store, and what the approver sees."""
        from flare_provider.publishing import model_review

        events = [e for _, evs in (triggering_asset_events or {}).items() for e in evs]
        return model_review(events, SNAPSHOT_URI, AWS_CONN_ID, PUBLISH_URI, FEDERATION)

    review = evaluate()

    approve = ApprovalOperator(
        task_id="approve",
        subject="Publish the global model of {{ ti.xcom_pull(task_ids='evaluate')['federation'] }}?",
        body="{{ ti.xcom_pull(task_ids='evaluate')['body'] }}",
        response_timeout=timedelta(days=7),
    )

    @task(outlets=[PUBLISHED])
    def publish(review: dict, *, outlet_events=None) -> dict:
        """Copy the approved model to the publish location; its event names it."""
        from flare_provider.publishing import publish_model

        record = publish_model(review, SNAPSHOT_URI, AWS_CONN_ID, PUBLISH_URI)
        outlet_events[PUBLISHED].extra = record
        return record

    review >> approve >> publish(review)

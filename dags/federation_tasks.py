"""What the example training DAGs share: their settings, trigger-form params and tasks.

Not a DAG file (``.airflowignore`` keeps the dag-processor from parsing it); the DAG
files import it, as Airflow puts the DAGs folder on ``sys.path``. Like them, it imports
nothing heavy: the operators load the engine, gRPC and numpy only when a task runs.

Settings come from the environment of the Airflow components:

- ``FLARE_CONN_ID``: the federation's ``flare`` connection, imported from the server kit
  with ``flare kit import-connection <server kit>``
  (default ``flare_default``);
- ``FLARE_APP_DIR``: the app folder to deploy (default: this repository's
  ``examples/apps/digits``), and ``FLARE_APP_NAME``: the name in its ``app.yaml``
  (default ``digits``);
- ``FLARE_SNAPSHOT_URI``: where rounds are committed, ``s3://bucket/prefix`` or
  ``file:///path`` (read by ``ScatterGatherOperator``; default
  ``file://$AIRFLOW_HOME/flare-snapshots``);
- ``FLARE_TRAIN_CONFIG``: a JSON object, the round config every site's trainer gets on
  top of its ``app.yaml`` (``{"lr": 0.2, "lr_schedule": "cosine"}``; default none);
- ``FLARE_AGGREGATOR``: the aggregator the trigger form offers first (default ``fedavg``),
  and ``FLARE_AGGREGATOR_ARGS``: a JSON object of its arguments
  (``{"server_lr": 0.03, "beta1": 0.5}``; default none). The arguments fit that aggregator
  only, so while they are set the form offers no other.

``make demo`` sets the last three to the digits recipe it compares with each site alone.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Param

from flare_provider.aggregation.names import BUILTIN_AGGREGATORS
from flare_provider.operators import DeployAppOperator, ScatterGatherOperator
from flare_provider.sensors.sites_ready import SitesReadySensor

CONN_ID = os.environ.get("FLARE_CONN_ID") or "flare_default"
REPO = Path(__file__).resolve().parent.parent
APP_DIR = os.environ.get("FLARE_APP_DIR") or str(REPO / "examples" / "apps" / "digits")
APP_NAME = os.environ.get("FLARE_APP_NAME") or "digits"


def _json_object(name: str) -> dict[str, Any]:
    """The JSON object in environment variable ``name`` ({} when unset)."""
    raw = os.environ.get(name) or "{}"
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {raw!r}")
    return value


TRAIN_CONFIG = _json_object("FLARE_TRAIN_CONFIG")
AGGREGATOR = os.environ.get("FLARE_AGGREGATOR") or "fedavg"
AGGREGATOR_ARGS = _json_object("FLARE_AGGREGATOR_ARGS")
if AGGREGATOR not in BUILTIN_AGGREGATORS:
    raise ValueError(f"FLARE_AGGREGATOR must be one of {', '.join(BUILTIN_AGGREGATORS)}, got {AGGREGATOR!r}")

# The trigger form validates these; the DAGs render templates as native objects, so
# "{{ params.rounds }}" reaches the operator as an int and an empty min_clients as None.
TRAINING_PARAMS = {
    "rounds": Param(5, type="integer", minimum=1, maximum=1000, title="Rounds", description="Federated rounds to run."),
    "min_clients": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        title="Minimum sites",
        description="Sites that must be up to start and that a round needs results from; empty: every site.",
    ),
    "aggregator": Param(
        AGGREGATOR,
        type="string",
        enum=[AGGREGATOR] if AGGREGATOR_ARGS else list(BUILTIN_AGGREGATORS),
        title="Aggregator",
        description="How the sites' updates are combined into the global model.",
    ),
}


def training_tasks(**train_kwargs: Any) -> ScatterGatherOperator:
    """``sites_ready >> deploy >> train`` in the DAG being defined; returns ``train``.

    ``train_kwargs`` go to ``ScatterGatherOperator`` (``initial_model``, ``deferrable``, ...).
    """
    ready = SitesReadySensor(
        task_id="sites_ready",
        flare_conn_id=CONN_ID,
        min_clients="{{ params.min_clients }}",
        mode="reschedule",  # a site still starting up costs no worker slot
        poke_interval=10,
        timeout=600,
    )
    deploy = DeployAppOperator(
        task_id="deploy", app_dir=APP_DIR, flare_conn_id=CONN_ID, retries=1, retry_delay=timedelta(seconds=30)
    )
    train = ScatterGatherOperator(
        task_id="train",
        app_name=APP_NAME,
        flare_conn_id=CONN_ID,
        num_rounds="{{ params.rounds }}",
        min_clients="{{ params.min_clients }}",
        aggregator="{{ params.aggregator }}",
        aggregator_args=AGGREGATOR_ARGS,
        train_config=TRAIN_CONFIG,
        evaluate=True,
        # A retry resumes after the last committed round and re-attaches to the sites'
        # tasks of a round in flight: nothing is trained twice.
        retries=2,
        retry_delay=timedelta(seconds=30),
        **train_kwargs,
    )
    ready >> deploy >> train
    return train

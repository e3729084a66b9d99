"""Training curves kept and streamed: each round's per-site curves in the snapshot store,
TensorBoard event files under the run, and (with a tracking server configured) MLflow runs.

No Airflow and nothing heavy at import: the engines build a
:class:`~flare_provider.tracking.tracker.RunTracking`; TensorBoard's writer is imported only
when a round is written, and MLflow is spoken to over its REST API (see ``docs/tracking.md``).
"""

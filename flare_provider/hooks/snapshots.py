"""``SnapshotStoreHook``: a snapshot store from a URI and, for ``s3://``, an Airflow AWS connection.

One place turns ``snapshot_uri`` + ``aws_conn_id`` into a
:class:`~flare_provider.snapshots.SnapshotStore`, for the operators and the Federation
page alike. The Amazon provider is not needed: the connection's fields are read here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

if TYPE_CHECKING:
    from flare_provider.snapshots import SnapshotStore

SNAPSHOT_URI_ENV = "FLARE_SNAPSHOT_URI"
SNAPSHOT_SCHEMES = ("s3://", "file://")


def default_snapshot_uri() -> str:
    """``$FLARE_SNAPSHOT_URI``, else ``file://$AIRFLOW_HOME/flare-snapshots`` (the embedded default)."""
    if os.environ.get(SNAPSHOT_URI_ENV):
        return os.environ[SNAPSHOT_URI_ENV]
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return "file://" + os.path.join(os.path.abspath(home), "flare-snapshots")


def s3_settings_from_connection(conn: Any) -> dict[str, Any]:
    """boto3 settings from an Airflow AWS connection.

    Reads login/password as the access key pair and ``endpoint_url``, ``region_name``,
    ``aws_session_token`` (also under ``extra.config_kwargs``/``service_config.s3``) from extra.
    """
    extra = conn.extra_dejson
    settings: dict[str, Any] = {}
    if conn.login:
        settings["aws_access_key_id"] = conn.login
    if conn.password:
        settings["aws_secret_access_key"] = conn.password
    endpoint = extra.get("endpoint_url") or extra.get("service_config", {}).get("s3", {}).get("endpoint_url") or conn.host
    if endpoint:
        settings["endpoint_url"] = endpoint
    for key in ("region_name", "aws_session_token"):
        if extra.get(key):
            settings[key] = extra[key]
    return settings


class SnapshotStoreHook(BaseHook):
    """The snapshot store at ``snapshot_uri`` (default :func:`default_snapshot_uri`).

    :param aws_conn_id: an AWS connection for ``s3://`` (else boto3's standard chain).
    """

    def __init__(self, snapshot_uri: str | None = None, aws_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot_uri = snapshot_uri or default_snapshot_uri()
        self.aws_conn_id = aws_conn_id

    def get_store(self, **kwargs: Any) -> "SnapshotStore":
        """A store; ``kwargs`` go to :class:`~flare_provider.snapshots.SnapshotStore` (e.g. ``attempts``)."""
        from flare_provider.snapshots import SnapshotStore

        settings = None
        if self.snapshot_uri.startswith("s3://") and self.aws_conn_id:
            settings = s3_settings_from_connection(self.get_connection(self.aws_conn_id))
        return SnapshotStore(self.snapshot_uri, s3_settings=settings, **kwargs)

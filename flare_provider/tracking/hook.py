"""``MlflowTrackingHook``: an MLflow tracking server from an Airflow connection (type ``mlflow``).

The connection's host is the tracking URI (``http://mlflow.example:5000``, or a bare host
name with the scheme in *schema* and the port in *port*); *login* and *password* sign in
with HTTP basic authentication, or extra ``token`` with a bearer token; extra
``experiment_name`` files the runs under that experiment (default: the federation's name).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from .mlflow_client import MlflowSettings


class MlflowTrackingHook(BaseHook):
    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    conn_type = "mlflow"
    hook_name = "MLflow tracking server"

    def __init__(self, mlflow_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mlflow_conn_id = mlflow_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden-fields": [],
            "relabeling": {"host": "Tracking URI or host"},
            "placeholders": {"host": "http://mlflow.example:5000", "extra": '{"experiment_name": "federated"}'},
        }

    def get_settings(self) -> MlflowSettings:
        """The tracking server's address and sign-in; ValueError naming the connection when it is unusable."""
        return settings_from_connection(self.get_connection(self.mlflow_conn_id))


def settings_from_connection(conn: Any) -> MlflowSettings:
    extra = conn.extra_dejson or {}
    host = (conn.host or "").strip()
    if not host:
        raise ValueError(f"MLflow connection {conn.conn_id!r} has no host (the tracking URI)")
    if "://" in host:
        uri = host
    else:
        scheme = conn.schema if conn.schema in ("http", "https") else "http"
        uri = f"{scheme}://{host}" + (f":{conn.port}" if conn.port else "")
    try:
        return MlflowSettings(uri, experiment=extra.get("experiment_name") or None, username=conn.login or None,
                              password=conn.password or None, token=extra.get("token") or None)
    except ValueError as exc:
        raise ValueError(f"MLflow connection {conn.conn_id!r}: {exc}") from None


def mlflow_settings(mlflow_conn_id: str | None) -> MlflowSettings | None:
    """The operators' ``mlflow_conn_id`` as settings (None: no MLflow); ValueError when the connection is unusable."""
    if not mlflow_conn_id:
        return None
    try:
        return MlflowTrackingHook(mlflow_conn_id).get_settings()
    except ValueError:
        raise
    except Exception as exc:  # not found (AirflowNotFoundException) or unreadable
        raise ValueError(f"MLflow connection {mlflow_conn_id!r}: {exc}") from None

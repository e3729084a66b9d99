"""The Federation page's web app, mounted by the api-server under ``/flare``.

Access works as in the core UI: the caller is the Airflow user of the ``_token`` cookie
or an ``Authorization: Bearer`` token (401 without one), who must be allowed to use the
UI (403 otherwise). Within the page, a user sees the live sites of the ``flare``
connections they may read, and the runs of the DAGs whose runs they may read; a run
not started by a DAG needs access to every DAG.

Settings (``airflow.cfg`` section ``[flare]``, or ``AIRFLOW__FLARE__<KEY>``):

- ``dashboard_conn_ids``: comma-separated connection ids (default: every connection of
  type ``flare`` in Airflow's database);
- ``dashboard_snapshot_uri``: the snapshot store to read (default: the operators'
  default, ``$FLARE_SNAPSHOT_URI`` or ``file://$AIRFLOW_HOME/flare-snapshots``);
- ``dashboard_aws_conn_id``: an AWS connection for an ``s3://`` store;
- ``dashboard_status_timeout``: seconds to wait for each agent (default 5).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import quote, urlencode

from airflow.api_fastapi.app import API_ROOT_PATH, get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import (
    AccessView,
    ConnectionDetails,
    DagAccessEntity,
    DagDetails,
)
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_view
from airflow.configuration import conf
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.exceptions import HTTPException

from .charts import run_charts, site_colors
from .dashboard import ConnectionView, RunView, connection_sites, read_runs, reason, utc
from .live import REFRESH_SECONDS, rounds_in_progress

SECTION = "flare"


@dataclass(frozen=True)
class Settings:
    conn_ids: tuple[str, ...] | None
    snapshot_uri: str
    aws_conn_id: str | None
    status_timeout: float

    @classmethod
    def from_conf(cls) -> "Settings":
        from flare_provider.hooks.snapshots import default_snapshot_uri

        ids = [c.strip() for c in (conf.get(SECTION, "dashboard_conn_ids", fallback="") or "").split(",") if c.strip()]
        return cls(
            conn_ids=tuple(ids) or None,
            snapshot_uri=conf.get(SECTION, "dashboard_snapshot_uri", fallback="") or default_snapshot_uri(),
            aws_conn_id=conf.get(SECTION, "dashboard_aws_conn_id", fallback="") or None,
            status_timeout=conf.getfloat(SECTION, "dashboard_status_timeout", fallback=5.0),
        )


def create_app() -> FastAPI:
    app = FastAPI(title="Federation", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(HTTPException, _error_page)
    app.add_api_route(
        "/",
        federation_page,
        methods=["GET"],
        response_class=HTMLResponse,
        dependencies=[Depends(requires_access_view(AccessView.WEBSITE))],
    )
    # The round in progress: the page's fragment, fetched again every few seconds, and its data.
    app.add_api_route("/live", live_fragment, methods=["GET"], response_class=HTMLResponse,
                      dependencies=[Depends(requires_access_view(AccessView.WEBSITE))])
    app.add_api_route("/curves", live_curves, methods=["GET"], response_class=JSONResponse,
                      dependencies=[Depends(requires_access_view(AccessView.WEBSITE))])
    return app


def federation_page(user: GetUserDep, federation: str | None = None, run: str | None = None) -> HTMLResponse:
    """Sites, runs and one run's rounds (the newest run the user may see, unless one is named)."""
    settings = Settings.from_conf()
    auth = get_auth_manager()
    all_connections = _flare_connections(settings)
    conn_ids = _readable(user, all_connections)
    # The agents and the store answer at their own pace: ask them all at once.
    with ThreadPoolExecutor(max_workers=len(conn_ids) + 1) as pool:
        runs_future = pool.submit(_read_store, settings)
        connections: list[ConnectionView] = list(pool.map(lambda c: connection_sites(c, settings.status_timeout), conn_ids))
        runs, store_error = runs_future.result()
    connections.sort(key=lambda c: bool(c.error))  # working federations first

    @cache
    def may_read_runs(dag_id: str | None) -> bool:
        details = DagDetails(id=dag_id, team_name=_dag_team(dag_id)) if dag_id else DagDetails()
        return auth.is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN, details=details, user=user)

    runs = [r for r in runs if may_read_runs(r.dag_id)]
    selected = runs[0] if runs else None
    if federation is not None or run is not None:
        # A run the user may not see is answered like one that does not exist.
        selected = next((r for r in runs if (r.federation, r.run) == (federation, run)), None)
        if selected is None:
            raise HTTPException(404, f"No run {run!r} of federation {federation!r} in the snapshot store")
    colors = site_colors(selected.sites()) if selected else {}
    html = _template("federation.html").render(
        connections=connections,
        hidden_connections=len(all_connections) - len(conn_ids),
        store_uri=settings.snapshot_uri,
        store_error=store_error,
        runs=runs,
        selected=selected,
        charts=run_charts(selected.history, selected.metric_names(), colors) if selected else [],
        site_colors=colors,
        now=utc(time.time()),
        run_link=_run_link,
        dag_run_link=_dag_run_link,
        dag_link=_dag_link,
        **_live_context(connections),
    )
    return HTMLResponse(html)


def _readable(user: Any, connections: list[tuple[str, str | None]]) -> list[str]:
    """The ids of the ``flare`` connections ``user`` may read."""
    auth = get_auth_manager()
    return [
        conn_id
        for conn_id, team in connections
        if auth.is_authorized_connection(method="GET", details=ConnectionDetails(conn_id=conn_id, team_name=team), user=user)
    ]


def _live_connections(user: Any) -> list[ConnectionView]:
    settings = Settings.from_conf()
    conn_ids = _readable(user, _flare_connections(settings))
    with ThreadPoolExecutor(max_workers=len(conn_ids) + 1) as pool:
        return list(pool.map(lambda c: connection_sites(c, settings.status_timeout), conn_ids))


def _live_context(connections: list[ConnectionView]) -> dict[str, Any]:
    live = rounds_in_progress(connections)
    colors = site_colors(sorted({site for r in live for site in r.sites}))
    return {"live_rounds": live, "live_colors": colors, "live_refresh": REFRESH_SECONDS}


def live_fragment(user: GetUserDep) -> HTMLResponse:
    """The page's "round in progress" section alone (what the page fetches to redraw it)."""
    context = _live_context(_live_connections(user))
    return HTMLResponse(_template("live_curves.html").render(now=utc(time.time()), **context))


def live_curves(user: GetUserDep) -> JSONResponse:
    """The rounds in progress as data: each site's status, progress and curve by metric."""
    return JSONResponse({"rounds": [r.to_dict() for r in rounds_in_progress(_live_connections(user))]})


# ---- reading ------------------------------------------------------------------------


def _flare_connections(settings: Settings) -> list[tuple[str, str | None]]:
    """(conn_id, team) of the connections the page shows."""
    from airflow.models import Connection
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        stored = dict(session.execute(select(Connection.conn_id, Connection.team_name).where(Connection.conn_type == "flare")).all())
    if settings.conn_ids is None:
        return sorted(stored.items())
    # Named ones may live outside the database (environment, secrets backend).
    return [(conn_id, stored.get(conn_id)) for conn_id in settings.conn_ids]


def _read_store(settings: Settings) -> tuple[list[RunView], str]:
    try:
        return read_runs(_open_store(settings)), ""
    except Exception as exc:  # an unreachable or misconfigured store is shown, not raised
        return [], reason(exc)


def _open_store(settings: Settings):
    from flare_provider.hooks.snapshots import SnapshotStoreHook

    # One try per call: a page must answer promptly, and shows the error instead.
    return SnapshotStoreHook(settings.snapshot_uri, settings.aws_conn_id).get_store(attempts=1)


def _dag_team(dag_id: str) -> str | None:
    from airflow.models import DagModel

    return DagModel.get_team_name(dag_id) if conf.getboolean("core", "multi_team", fallback=False) else None


# ---- links and rendering ------------------------------------------------------------


def _run_link(run: RunView) -> str:
    return "?" + urlencode({"federation": run.federation, "run": run.run})


def _dag_link(dag_id: str) -> str:
    return f"{API_ROOT_PATH}dags/{quote(dag_id, safe='')}"


def _dag_run_link(run: RunView) -> str | None:
    airflow = run.airflow
    if not (airflow.get("dag_id") and airflow.get("run_id")):
        return None
    return f"{_dag_link(airflow['dag_id'])}/runs/{quote(airflow['run_id'], safe='')}"


@cache
def _environment() -> Environment:
    env = Environment(loader=PackageLoader("flare_provider.plugins", "templates"), autoescape=select_autoescape(default=True))
    env.filters["number"] = _number
    env.filters["seconds"] = _seconds
    env.filters["utc"] = utc
    return env


def _template(name: str):
    return _environment().get_template(name)


def _number(value: Any, digits: int = 4) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "–"
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"


def _seconds(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    minutes, seconds = divmod(float(value), 60)
    return f"{int(minutes)} min {seconds:04.1f} s" if minutes else f"{seconds:.1f} s"


async def _error_page(request: Request, exc: HTTPException) -> HTMLResponse:
    """The error as a small page; a caller without a login gets a link to log in."""
    login = None
    if exc.status_code == 401:
        next_url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        login = get_auth_manager().get_url_login(next_url=next_url)
    html = _template("error.html").render(status=exc.status_code, detail=exc.detail, login=login)
    return HTMLResponse(html, status_code=exc.status_code, headers=getattr(exc, "headers", None))

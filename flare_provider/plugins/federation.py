"""``FederationPlugin``: the Federation page in the Airflow UI.

The api-server serves the page under ``/flare/`` and the UI links it in its navigation
(shown in the UI at ``/plugin/federation``). It shows the sites live from their agents,
the runs committed to the snapshot store and, for one run, its metrics, participation
and round durations; :mod:`flare_provider.plugins.app` says who sees what, and how to
configure it.

Every Airflow component imports plugins, but only the api-server serves this one, so
this module imports nothing beyond Airflow's plugin base: the web app is built on the
first request it gets (:mod:`flare_provider.plugins.app`).
"""

from __future__ import annotations

from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/flare"
UI_ROUTE = "federation"

# A hub with three sites, in the UI's menu icon size.
_ICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="#6b7280" stroke-width="2">'
    '<circle cx="12" cy="12" r="3"/><circle cx="4" cy="5" r="2"/><circle cx="20" cy="5" r="2"/>'
    '<circle cx="12" cy="21" r="2"/><path d="M6 6.5l4 3.5M18 6.5l-4 3.5M12 15v4"/></svg>'
)
ICON = "data:image/svg+xml," + quote(_ICON_SVG)


class _PageApp:
    """ASGI app that builds the FastAPI app on its first request (see the module docstring)."""

    def __init__(self) -> None:
        self._app = None

    async def __call__(self, scope, receive, send) -> None:
        if self._app is None:
            from flare_provider.plugins.app import create_app

            self._app = create_app()
        await self._app(scope, receive, send)


class FederationPlugin(AirflowPlugin):
    """The Federation page: sites, runs and rounds of the federations Airflow trains."""

    name = "flare_federation"
    fastapi_apps = [{"app": _PageApp(), "url_prefix": URL_PREFIX, "name": "Federation"}]
    external_views = [
        {
            "name": "Federation",
            "href": f"{URL_PREFIX}/",
            "url_route": UI_ROUTE,
            "destination": "nav",
            "icon": ICON,
        }
    ]

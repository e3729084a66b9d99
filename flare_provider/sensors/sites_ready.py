"""``SitesReadySensor``: wait until enough sites answer (and have the app)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseSensorOperator


class SitesReadySensor(BaseSensorOperator):
    """Succeeds once ``min_clients`` of ``sites`` answer over mutual TLS, with ``app_name``
    deployed when one is given. Each poke logs every site's state.

    :param min_clients: sites needed (default: all of them).
    :param sites: site names (default: every site of the connection).
    :param app_name: also require this app to be deployed.
    """

    template_fields: Sequence[str] = ("min_clients", "sites", "app_name")

    def __init__(
        self,
        *,
        min_clients: int | None = None,
        sites: Sequence[str] | None = None,
        app_name: str | None = None,
        flare_conn_id: str = "flare_default",
        status_timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.min_clients = min_clients
        self.sites = sites
        self.app_name = app_name
        self.flare_conn_id = flare_conn_id
        self.status_timeout = status_timeout

    def poke(self, context: Any) -> bool:
        from flare_provider.hooks.flare import FlareHook

        hook = FlareHook(self.flare_conn_id)
        sites = list(self.sites or hook.sites)
        needed = int(self.min_clients) if self.min_clients is not None else len(sites)
        ready = []
        for site, status in sorted(hook.site_status(sites, self.status_timeout).items()):
            if isinstance(status, Exception):
                self.log.info("%s: not reachable: %s", site, status)
            elif self.app_name and self.app_name not in {a.name for a in status.apps}:
                self.log.info("%s: up (version %s) but app %r is not deployed", site, status.version, self.app_name)
            else:
                self.log.info("%s: ready (version %s, GPUs %s)", site, status.version, list(status.gpus) or "none")
                ready.append(site)
        self.log.info("%d of %d sites ready; %d needed", len(ready), len(sites), needed)
        return len(ready) >= needed

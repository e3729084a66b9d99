"""``DeployAppOperator``: sign an app with the server identity and deploy it to the sites."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

ALL_SITES = "@ALL"


_REFUSED_MARK = "will not run it"


def _not_runnable(app: Any) -> str:
    """Why a site took an app version but will not run it (its reason, and what would change that)."""
    what = f"app {app.name!r} version {app.version}"
    if app.consent_status == "pending":
        return f"{what} is held until approved at the site: {app.consent_reason}"
    if app.consent_status not in ("", "allowed"):
        return f"{what}: the site {_REFUSED_MARK}: {app.consent_reason}"
    return f"{what}: the site {_REFUSED_MARK}, its environment lacks {', '.join(app.missing_requirements)}"


class DeployAppOperator(BaseOperator):
    """Bundle ``app_dir``, sign it, and deploy it to the sites in parallel.

    :param app_dir: an app folder (``app.yaml`` and optional ``custom/``), or with
        ``deploy_map`` a job folder holding one sub-folder per app (templated).
    :param sites: site names, or None for every site of the connection (templated).
    :param deploy_map: NVIDIA FLARE style ``{app folder: [sites or "@ALL"]}`` (templated).
    :param flare_conn_id: the federation's ``flare`` connection.

    Deploying content a site has already is a no-op there. Returns
    ``{site: {app: version}}``; fails naming every site that did not take its apps, or
    will not run them, with the site's reason: custom code it does not allow, a version
    held until an operator there approves it (``flare approve``; a retry of this task
    then succeeds), requirements its environment lacks (docs/apps.md).
    """

    template_fields: Sequence[str] = ("app_dir", "sites", "deploy_map")
    ui_color = "#fff2cc"

    def __init__(
        self,
        *,
        app_dir: str,
        sites: Sequence[str] | None = None,
        deploy_map: Mapping[str, Sequence[str]] | None = None,
        flare_conn_id: str = "flare_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if sites is not None and deploy_map is not None:
            raise ValueError(f"{type(self).__name__} {self.task_id!r}: give sites or deploy_map, not both")
        self.app_dir = app_dir
        self.sites = sites
        self.deploy_map = deploy_map
        self.flare_conn_id = flare_conn_id

    def _plan(self, all_sites: list[str]) -> dict[str, list[Path]]:
        """Which app folders go to which site."""
        base = Path(self.app_dir)
        mapping = dict(self.deploy_map) if self.deploy_map else {".": list(self.sites or [ALL_SITES])}
        plan: dict[str, list[Path]] = {}
        for app, targets in mapping.items():
            folder = base if app == "." else base / app
            for site in all_sites if ALL_SITES in targets else targets:
                if site not in all_sites:
                    raise AirflowFailException(f"site {site!r} is not in connection {self.flare_conn_id!r} (sites: {all_sites})")
                plan.setdefault(site, []).append(folder)
        return plan

    def execute(self, context: Any) -> dict[str, dict[str, str]]:
        from concurrent.futures import ThreadPoolExecutor

        from flare_provider.hooks.flare import FlareHook
        from flare_provider.wire.bundles import BundleError, build_bundle

        hook = FlareHook(self.flare_conn_id)
        kit = hook.get_kit()
        plan = self._plan(sorted(kit.sites))
        bundles: dict[Path, bytes] = {}
        try:
            for folder in {f for folders in plan.values() for f in folders}:
                bundles[folder] = build_bundle(folder, kit.cert_pem, kit.key_pem)
        except BundleError as exc:
            raise AirflowFailException(str(exc)) from exc

        def deploy(site: str) -> dict[str, str]:
            deployed = {}
            with hook.get_client(site) as client:
                for folder in plan[site]:
                    app, new = client.deploy_app(bundles[folder])
                    self.log.info("%s: %s@%s %s", site, app.name, app.version, "deployed" if new else "already there")
                    if not app.runnable:
                        raise AirflowException(_not_runnable(app))
                    deployed[app.name] = app.version
            return deployed

        results: dict[str, dict[str, str]] = {}
        failures: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(plan)))) as pool:
            futures = {site: pool.submit(deploy, site) for site in plan}
        for site, future in sorted(futures.items()):
            exc = future.exception()
            if exc is None:
                results[site] = future.result()
            else:
                failures[site] = str(exc)
                self.log.error("%s: deployment failed: %s", site, exc)
        if failures:
            if all(_REFUSED_MARK in reason for reason in failures.values()):  # only the sites' settings can change that
                raise AirflowFailException(
                    f"deployment refused on {len(failures)} of {len(plan)} sites: " + "; ".join(f"{s}: {e}" for s, e in failures.items()))
            raise AirflowException(f"deployment failed on {len(failures)} of {len(plan)} sites: " + "; ".join(f"{s}: {e}" for s, e in failures.items()))
        return results

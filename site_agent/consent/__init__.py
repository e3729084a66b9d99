"""The site's consent: which apps' custom code runs here, and whether an app's requirements are met.

- :mod:`.policy`: ``custom_code`` in site.yaml and the judgement of one app version;
- :mod:`.approvals`: the operator's approvals and rejections (``flare approve``);
- :mod:`.requirements`: an app's Python requirements against the workers' interpreter;
- :mod:`.command`: ``flare approve``, run at the site.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import TaskRejected
from .approvals import read_decision
from .policy import ALLOWED, PENDING, REFUSED, REJECTED, Consent, CustomCodePolicy, decide

if TYPE_CHECKING:
    from ..runtime.app_store import AppInfo
    from ..site_settings import SiteSettings

__all__ = ["ALLOWED", "PENDING", "REFUSED", "REJECTED", "Consent", "CustomCodePolicy", "check_task", "judge"]


def judge(policy: CustomCodePolicy, app: "AppInfo", site: str) -> Consent:
    """How the deployed version ``app`` stands with this site's rules and its operator's decisions."""
    return decide(policy, app.name, app.version, app.signer, app.has_custom_code, read_decision(app.path.parent), site)


def check_task(settings: "SiteSettings", app: "AppInfo", site: str) -> None:
    """Raise :class:`TaskRejected` saying why a task of ``app`` must not run here (consent, then requirements)."""
    from .requirements import missing_requirements

    consent = judge(settings.custom_code, app, site)
    if not consent.runnable:
        raise TaskRejected(consent.reason)
    missing = missing_requirements(app.config().requirements, settings.python)
    if missing:
        where = settings.python or "the agent's Python"
        raise TaskRejected(f"app {app.name!r} needs Python packages that site {site!r} lacks in {where}: "
                           f"{', '.join(missing)} (the site installs them there, or names a prepared "
                           "environment as python: in local/site.yaml)")


def app_standing(settings: "SiteSettings", app: "AppInfo", site: str, with_requirements: bool = False) -> dict:
    """The ``AppInfo`` message fields saying how ``app`` stands here (its requirements only when asked:
    checking them may start the workers' interpreter)."""
    from .requirements import missing_requirements

    consent = judge(settings.custom_code, app, site)
    fields = {"consent_status": consent.status, "consent_reason": consent.reason}
    if with_requirements:
        try:
            fields["missing_requirements"] = missing_requirements(app.config().requirements, settings.python)
        except TaskRejected as exc:  # the environment could not be asked: say so rather than fail the deploy
            fields["missing_requirements"] = [str(exc)]
    return fields

"""Which apps' custom code a site runs: ``custom_code`` in ``local/site.yaml``.

Custom code (anything under an app's ``custom/``) is code from outside the site, so the
site says which of it may run, by one or more of:

``allow``
    app versions by name and version digest (the bundle's content hash, which the
    deploy operator logs and ``flare approve --list`` shows): exactly that code;
``signers``
    server identities of the federation: any version they signed;
``require_approval``
    every other version is held after its deploy, stored but not runnable, until an
    operator at the site runs ``flare approve`` (or ``--reject``) for it.

The older ``allow_custom_code: true`` allows every version the federation's servers
sign; it cannot be combined with ``custom_code``. Apps without custom code (the
built-in trainers) always run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flare_provider.wire.app_config import APP_NAME_RE

_VERSION_RE = re.compile(r"^[0-9a-f]{64}\Z")
_KEYS = ("allow", "signers", "require_approval")

# How a deployed version stands with the site (AppInfo.consent_status on the wire).
ALLOWED, PENDING, REFUSED, REJECTED = "allowed", "pending", "refused", "rejected"


class ConsentConfigError(ValueError):
    """``custom_code`` in site.yaml is malformed; the message names the field."""


@dataclass(frozen=True)
class AllowedVersion:
    app: str
    version: str


@dataclass(frozen=True)
class CustomCodePolicy:
    """The site's rules for custom code (see the module docstring); the default allows none."""

    allow_all: bool = False  # allow_custom_code: true
    allow: tuple[AllowedVersion, ...] = ()
    signers: tuple[str, ...] = ()
    require_approval: bool = False
    configured: bool = False  # custom_code was given: each version is judged by the rules above

    @property
    def may_run_any(self) -> bool:
        """Whether some custom code may run here at all (each version is still judged before its worker starts)."""
        return self.allow_all or self.configured

    def describe(self) -> str:
        if self.allow_all:
            return "any version signed by the federation's servers (allow_custom_code: true)"
        if not self.configured:
            return "none (allow_custom_code: false)"
        parts = []
        if self.allow:
            parts.append(f"{len(self.allow)} listed version(s)")
        if self.signers:
            parts.append(f"versions signed by {', '.join(self.signers)}")
        if self.require_approval:
            parts.append("others after approval at the site (flare approve)")
        return "; ".join(parts) or "none (custom_code lists nothing)"


@dataclass(frozen=True)
class Consent:
    """How one deployed version stands: ``status`` (allowed, pending, refused, rejected) and why."""

    status: str
    reason: str

    @property
    def runnable(self) -> bool:
        return self.status == ALLOWED


def parse_custom_code(value: Any, allow_custom_code: bool, source: str) -> CustomCodePolicy:
    """Validate ``custom_code`` (None when absent) beside ``allow_custom_code``."""
    if value is None:
        return CustomCodePolicy(allow_all=allow_custom_code)
    where = f"{source}: custom_code"
    if allow_custom_code:
        raise ConsentConfigError(
            f"{where}: give either allow_custom_code: true (any signed version) or custom_code (the versions, "
            "signers or approvals allowed), not both"
        )
    if not isinstance(value, dict):
        raise ConsentConfigError(f"{where} must be a mapping with {', '.join(_KEYS)}, found {value!r}")
    unknown = sorted(set(value) - set(_KEYS), key=repr)
    if unknown:
        raise ConsentConfigError(f"{where}: unknown key(s) {unknown}; known keys are {list(_KEYS)}")
    require_approval = value.get("require_approval", False)
    if not isinstance(require_approval, bool):
        raise ConsentConfigError(f"{where}.require_approval must be true or false, found {require_approval!r}")
    return CustomCodePolicy(
        allow=_allow_list(value.get("allow"), where),
        signers=_signers(value.get("signers"), where),
        require_approval=require_approval,
        configured=True,
    )


def _allow_list(value: Any, where: str) -> tuple[AllowedVersion, ...]:
    if value is None:
        return ()
    example = "[{app: NAME, version: <64 hex digits>}]"
    if not isinstance(value, list):
        raise ConsentConfigError(f"{where}.allow must be a list such as {example}, found {value!r}")
    entries = []
    for index, item in enumerate(value):
        at = f"{where}.allow[{index}]"
        if not isinstance(item, dict) or set(item) != {"app", "version"}:
            raise ConsentConfigError(f"{at} must be {{app: NAME, version: DIGEST}}, found {item!r}")
        app, version = item["app"], item["version"]
        if not isinstance(app, str) or not APP_NAME_RE.match(app):
            raise ConsentConfigError(f"{at}.app must be an app name (1-64 letters, digits, '.', '_' or '-'), found {app!r}")
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise ConsentConfigError(
                f"{at}.version must be the app's full version digest (64 lowercase hex digits, as "
                f"'flare approve --list' or the deploy log shows), found {version!r}"
            )
        entries.append(AllowedVersion(app, version))
    return tuple(entries)


def _signers(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ConsentConfigError(f"{where}.signers must be a list of server participant names, found {value!r}")
    return tuple(value)


def decide(policy: CustomCodePolicy, name: str, version: str, signer: str, has_custom_code: bool,
           decision: dict[str, Any] | None, site: str) -> Consent:
    """Whether version ``version`` of app ``name`` may run here.

    ``decision`` is the site operator's recorded approval or rejection of this very
    version (:mod:`.approvals`), None when there is none.
    """
    short = f"app {name!r} version {version[:12]}"
    if not has_custom_code:
        return Consent(ALLOWED, "no custom code (built-in trainer)")
    if decision is not None and decision.get("decision") == REJECTED:
        return Consent(REJECTED, f"{short} brings custom code that site {site!r} rejected "
                                 f"({_by(decision)}); deploy a new version")
    if policy.allow_all:
        return Consent(ALLOWED, "custom code allowed (allow_custom_code: true)")
    if not policy.configured:
        return Consent(REFUSED, f"app {name!r} brings custom code and site {site!r} does not allow it "
                                "(allow_custom_code in local/site.yaml)")
    if AllowedVersion(name, version) in policy.allow:
        return Consent(ALLOWED, "listed in custom_code.allow")
    if signer and signer in policy.signers:
        return Consent(ALLOWED, f"signed by {signer!r} (custom_code.signers)")
    if decision is not None and decision.get("decision") == "approved":
        return Consent(ALLOWED, f"approved at the site ({_by(decision)})")
    if policy.require_approval:
        return Consent(PENDING, f"{short} brings custom code and waits for approval at site {site!r}: "
                                f"an operator there runs 'flare approve {name} --version {version} --kit KIT'")
    return Consent(REFUSED, f"{short} brings custom code that site {site!r} does not allow: not in custom_code.allow "
                            f"of its local/site.yaml, and its signer {signer or 'unknown'!r} is not in custom_code.signers")


def _by(decision: dict[str, Any]) -> str:
    who = decision.get("by") or "an operator"
    return f"by {who} at {decision.get('at_utc', 'an unknown time')}"

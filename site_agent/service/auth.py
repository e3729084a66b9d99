"""Who may do what on this agent, decided from the caller's certificate alone.

TLS has already proved that the caller holds a certificate issued by the project's root
CA; this module reads who it names (CN, O, OU = kind, admin role) and applies the rules:

* a server identity (OU ``server`` with a CN among the server participants that
  ``agent.json`` names; two or more for high availability) deploys apps, runs tasks, reads
  and acknowledges their results, aborts them and reads status;
* every admin reads status; a ``project_admin`` also aborts tasks and shuts the agent
  down; an ``org_admin`` or ``lead`` aborts tasks on a site of their own org only;
* anyone else, sites included, is denied.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc
from cryptography import x509

from flare_provider.provisioning.certs import PeerIdentity, describe_certificate

ANONYMOUS = PeerIdentity(name="", org="", kind="", role=None)


class Action(str, enum.Enum):
    STATUS = "status"
    DEPLOY = "deploy"
    SUBMIT = "submit"
    READ_TASK = "read_task"
    FETCH = "fetch"
    ACKNOWLEDGE = "acknowledge"
    ABORT = "abort"
    SHUTDOWN = "shutdown"


_SERVER_ACTIONS = frozenset(Action) - {Action.SHUTDOWN}
_ORG_SCOPED_ROLES = ("org_admin", "lead")


def peer_identity(context: grpc.ServicerContext) -> PeerIdentity:
    """The verified client certificate's holder, or :data:`ANONYMOUS` without one."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return ANONYMOUS
    try:
        return describe_certificate(x509.load_pem_x509_certificate(pems[0]))
    except ValueError:
        return ANONYMOUS


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # why it was refused: said to the caller and written to the audit log


@dataclass(frozen=True)
class Policy:
    """The rules above for one site."""

    server_names: frozenset[str]
    site_org: str

    def __post_init__(self) -> None:
        # A single name is one server, not a set of its characters.
        names = {self.server_names} if isinstance(self.server_names, str) else self.server_names
        object.__setattr__(self, "server_names", frozenset(names))

    def decide(self, peer: PeerIdentity, action: Action) -> Decision:
        if peer.kind == "server":
            if peer.name not in self.server_names:
                names = ", ".join(repr(n) for n in sorted(self.server_names))
                return _deny(f"{peer.name!r} is not this federation's server identity ({names})")
            if action in _SERVER_ACTIONS:
                return _ALLOW
            return _deny(f"the server identity may not {action.value}")
        if peer.kind == "admin":
            return self._decide_admin(peer, action)
        if peer.kind == "client":
            return _deny(f"{peer.name!r} is a site; sites may not call other agents")
        return _deny("the certificate names no participant kind this agent knows")

    def _decide_admin(self, peer: PeerIdentity, action: Action) -> Decision:
        role = peer.role or "none"
        if action is Action.STATUS or (role == "project_admin" and action in (Action.ABORT, Action.SHUTDOWN)):
            return _ALLOW
        if action is Action.ABORT and role in _ORG_SCOPED_ROLES:
            if peer.org == self.site_org:
                return _ALLOW
            return _deny(f"an {role} of org {peer.org!r} may abort tasks only on sites of that org (this site: {self.site_org!r})")
        return _deny(f"admin role {role!r} may not {action.value}")


_ALLOW = Decision(True, "")


def _deny(reason: str) -> Decision:
    return Decision(False, reason)

"""What an agent's calls return, and the one error every failed call raises."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from ..wire import agent_pb2
from ..wire.task_state import TaskState


class AgentError(Exception):
    """A call to a site's agent failed; ``code`` is the gRPC status code."""

    def __init__(self, site: str, method: str, code: grpc.StatusCode, details: str):
        self.site = site
        self.method = method
        self.code = code
        self.details = details
        super().__init__(f"site {site!r}: {method} failed: {code.name}: {details}")



@dataclass(frozen=True)
class AppVersion:
    name: str
    version: str
    has_custom_code: bool
    deployed_at: float
    # how the site stands on running it: "allowed", "pending" (held for approval at the site),
    # "refused", "rejected"; "" from an agent that does not say (allowed)
    consent_status: str = ""
    consent_reason: str = ""
    missing_requirements: tuple[str, ...] = ()  # app.yaml requirements the site's environment lacks

    @property
    def runnable(self) -> bool:
        return self.consent_status in ("", "allowed") and not self.missing_requirements

    @classmethod
    def from_message(cls, m: agent_pb2.AppInfo) -> "AppVersion":
        return cls(m.name, m.version, m.has_custom_code, m.deployed_at, m.consent_status, m.consent_reason,
                   tuple(m.missing_requirements))


@dataclass(frozen=True)
class RelayAttachment:
    """One relay a site dials out to, as its agent reports it."""

    relay: str  # the relay's participant name
    address: str  # host:port the agent dials
    connected_since: float  # seconds since the epoch; 0 while not connected
    last_ping: float  # seconds since the epoch of the last keepalive answered
    attached: bool
    error: str  # why the last attempt failed ("" when attached)

    @classmethod
    def from_message(cls, m: agent_pb2.RelayAttachment) -> "RelayAttachment":
        return cls(m.relay, m.address, m.connected_since, m.last_ping, m.attached, m.error)


@dataclass(frozen=True)
class AgentStatus:
    project: str
    site: str
    org: str
    version: str
    gpus: list[int]
    allow_custom_code: bool
    apps: list[AppVersion]
    active_tasks: list[TaskState]
    task_counts: dict[str, int]
    started_at: float
    caller: dict[str, str]  # how the agent identified us: name, org, kind, role
    attachments: list[RelayAttachment] = field(default_factory=list)  # empty for a site that listens
    # the site's data: site.yaml's data_version or a digest of its data folder's listing
    data_version: str = ""
    data_version_source: str = ""  # "site.yaml", "listing" or "" (none)
    data_version_seen_at: float = 0.0  # when the agent first saw this version
    custom_code_policy: str = ""  # whose custom code the site runs, in words
    payload_checksums: list[str] = field(default_factory=list)  # what it checks uploads with besides SHA-256

    @classmethod
    def from_message(cls, m: agent_pb2.AgentStatus) -> "AgentStatus":
        return cls(
            project=m.project,
            site=m.site,
            org=m.org,
            version=m.version,
            gpus=list(m.gpus),
            allow_custom_code=m.allow_custom_code,
            apps=[AppVersion.from_message(a) for a in m.apps],
            active_tasks=[TaskState.from_message(t) for t in m.active_tasks],
            task_counts=dict(m.task_counts),
            started_at=m.started_at,
            caller={"name": m.caller.name, "org": m.caller.org, "kind": m.caller.kind, "role": m.caller.role},
            attachments=[RelayAttachment.from_message(a) for a in m.attachments],
            data_version=m.data_version,
            data_version_source=m.data_version_source,
            data_version_seen_at=m.data_version_seen_at,
            custom_code_policy=m.custom_code_policy,
            payload_checksums=list(m.payload_checksums),
        )



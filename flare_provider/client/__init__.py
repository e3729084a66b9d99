"""Calling a site agent over mutual TLS: the Airflow side's (and an admin's) client.

:class:`AgentClient` is synchronous (operators, the ``flare`` CLI);
:class:`AsyncAgentClient` (grpc.aio) serves Airflow triggers. Both are built from PEM
material (the caller's certificate and key, the project's root CA), the site's name and
the address its agent is reached at. The agent's certificate is checked against the
site's name whatever the address, so a site is always talking to itself, not to
whoever answers at that address. Every call has a timeout, and every failure is an
:class:`AgentError` naming the site and the gRPC status code.

Modules: ``channel`` (credentials, channel options, timeouts), ``replies`` (what calls
return, and :class:`AgentError`), ``kit`` (a server or admin identity and the sites it
knows), ``sync`` and ``aio`` (the two clients). Imports neither Airflow nor PyTorch.
"""

from ..wire.task_state import TaskState
from .aio import AsyncAgentClient
from .channel import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_TIMEOUT,
    DEFAULT_TRANSFER_TIMEOUT,
    RECONNECT_BACKOFF_MS,
)
from .kit import CallerKit, KitError, SiteEndpoint, load_caller_kit
from .replies import AgentError, AgentStatus, AppVersion, RelayAttachment
from .sync import AgentClient
from .transfer import TransferStats

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_RESULT_BYTES",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TRANSFER_TIMEOUT",
    "RECONNECT_BACKOFF_MS",
    "AgentClient",
    "AgentError",
    "AgentStatus",
    "AppVersion",
    "AsyncAgentClient",
    "CallerKit",
    "KitError",
    "RelayAttachment",
    "SiteEndpoint",
    "TaskState",
    "TransferStats",
    "load_caller_kit",
]

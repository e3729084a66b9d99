"""Errors of the site agent's runtime, each with a message that names the problem.

The transport maps them to gRPC status codes; the suggested mapping is noted on each.
Messages never carry key material, passwords or tokens.
"""

from __future__ import annotations

from flare_provider.wire.bundles import BundleError

__all__ = [
    "AgentError",
    "BundleError",
    "InvalidTaskError",
    "NoResultError",
    "SettingsError",
    "TaskRejected",
    "UnknownAppError",
    "UnknownTaskError",
]


class AgentError(Exception):
    """Base of the agent's own errors (BundleError excepted: it is shared with the Airflow side)."""


class SettingsError(AgentError, ValueError):
    """The site's ``local/site.yaml`` is missing or wrong (the agent refuses to start)."""


class UnknownAppError(AgentError, LookupError):
    """No app of that name (or version) is deployed here. NOT_FOUND."""


class UnknownTaskError(AgentError, LookupError):
    """No task with that id is known here. NOT_FOUND."""


class TaskRejected(AgentError):
    """The site will not run this task as asked (custom code not allowed, too many GPUs...). FAILED_PRECONDITION."""


class InvalidTaskError(TaskRejected, ValueError):
    """The task request itself is malformed (bad id, config or weights file). INVALID_ARGUMENT."""


class NoResultError(AgentError):
    """The task has no result to hand over (not finished, failed, or already acknowledged). FAILED_PRECONDITION."""

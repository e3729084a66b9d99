"""Provisioning: project.yml in, signed startup kits out. Imports nothing from Airflow.

A run is a sequence of steps (:mod:`.steps`) over one :class:`ProvisionContext`,
driven by :func:`provision`.
"""

from .context import GENERATE, ProvisionContext, ProvisionResult
from .project import Participant, Project, ProjectError, load_project, parse_project
from .provisioner import provision
from .signature import KitVerificationError, require_valid, verify_folder
from .steps import STEPS
from .workspace import WorkspaceStateError

__all__ = [
    "GENERATE",
    "STEPS",
    "KitVerificationError",
    "Participant",
    "Project",
    "ProjectError",
    "ProvisionContext",
    "ProvisionResult",
    "WorkspaceStateError",
    "load_project",
    "parse_project",
    "provision",
    "require_valid",
    "verify_folder",
]

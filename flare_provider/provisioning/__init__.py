"""Provisioning: project.yml in, signed startup kits out. Imports nothing from Airflow."""

from .project import Participant, Project, ProjectError, load_project, parse_project
from .signature import KitVerificationError, require_valid, verify_folder
from .workspace import GENERATE, ProvisionResult, WorkspaceStateError, provision

__all__ = [
    "GENERATE",
    "KitVerificationError",
    "Participant",
    "Project",
    "ProjectError",
    "ProvisionResult",
    "WorkspaceStateError",
    "load_project",
    "parse_project",
    "provision",
    "require_valid",
    "verify_folder",
]

"""What one provisioning run knows, shared by its steps (:mod:`.steps`), and what it returns.

The request (project, workspace, sites to add, password) is fixed when the run starts;
the steps fill in the rest in order: the root CA and state, the ``prod_NN`` folder and
its staging copy, each participant's certificate, package and password, the records
for the state file.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .certs import Identity
from .project import Project
from .workspace import Workspace

GENERATE = object()
"""Pass as ``password`` to generate one password per participant."""


@dataclass
class ProvisionResult:
    project: Project
    prod_dir: Path
    root_fingerprint: str
    created_root: bool
    issued: list[str]
    reused: list[str]
    kits: dict[str, Path]
    packages: dict[str, Path]
    passwords: dict[str, str] = field(repr=False, default_factory=dict)

    def summary(self) -> dict:
        """Small, secret-free facts (for logs and XCom)."""
        return {
            "project": self.project.name,
            "prod_dir": str(self.prod_dir),
            "root_fingerprint": self.root_fingerprint,
            "created_root": self.created_root,
            "issued": self.issued,
            "reused": self.reused,
            "kits": {name: str(path) for name, path in self.kits.items()},
            "packages": {name: str(path) for name, path in self.packages.items()},
            "protected": bool(self.passwords),
        }


@dataclass
class ProvisionContext:
    project: Project
    workspace: Workspace
    add_sites: tuple[str, ...] = ()
    password: str | object | None = None  # None, one password for all, or GENERATE

    # The workspace's root CA and state document, read or created before any kit.
    root: Identity | None = field(default=None, repr=False)
    state: dict | None = None
    created_root: bool = False
    # This run's prod_NN, built in a hidden staging folder until it is complete.
    prod_number: int = 0
    staging: Path | None = None
    # Per participant, in project order.
    identities: dict[str, Identity] = field(default_factory=dict, repr=False)
    issued: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    records: dict[str, dict] = field(default_factory=dict)  # what state.json keeps of each
    passwords: dict[str, str] = field(default_factory=dict, repr=False)
    packages: dict[str, str] = field(default_factory=dict)  # each package's file name in prod_NN

    @property
    def prod_dir(self) -> Path:
        return self.workspace.prod_dir(self.prod_number)

    def kit_dir(self, name: str) -> Path:
        """Where ``name``'s kit is being written (inside the staging folder)."""
        return self.staging / name

    def discard_staging(self) -> None:
        """Remove a half-built prod folder; nothing to do once it was published."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    def result(self) -> ProvisionResult:
        names = [p.name for p in self.project.participants]
        return ProvisionResult(
            project=self.project,
            prod_dir=self.prod_dir,
            root_fingerprint=self.root.fingerprint,
            created_root=self.created_root,
            issued=self.issued,
            reused=self.reused,
            kits={name: self.prod_dir / name for name in names},
            packages={name: self.prod_dir / self.packages[name] for name in names},
            passwords=self.passwords,
        )

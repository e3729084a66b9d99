"""Provisioning a workspace: ``WORKSPACE/<project>/{state,prod_NN}``.

``state/`` keeps the root CA and what was issued, so re-runs and added sites reuse the
same root. Each run builds its ``prod_NN`` in a hidden staging folder and renames it into
place, then updates the state, so a failure leaves no half-written kit set behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..files import write_atomic
from .certs import Identity, create_root_ca, issue_certificate
from .kits import STARTUP, cert_file, key_file, write_kit
from .packages import ENCRYPTED_SUFFIX, encrypt, generate_password, zip_folder
from .project import Project, ProjectError

STATE_DIR = "state"
STATE_FILE = "state.json"
ROOT_CERT = "rootCA.pem"
ROOT_KEY = "rootCA.key"
_STATE_FORMAT = 1
_PROD_RE = re.compile(r"^prod_(\d+)$")

GENERATE = object()
"""Pass as ``password`` to generate one password per participant."""


class WorkspaceStateError(Exception):
    """The workspace's state cannot be trusted; provisioning refuses to go on."""


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


class Workspace:
    def __init__(self, root: str | Path, project_name: str):
        self.project_dir = Path(root) / project_name
        self.state_dir = self.project_dir / STATE_DIR
        self.project_name = project_name

    # ---- state -------------------------------------------------------------------

    def load_state(self) -> tuple[Identity, dict] | None:
        """The root CA and state document, or None for a new workspace."""
        if not self.state_dir.exists():
            return None
        bad = f"workspace state in {self.state_dir} is corrupted"
        advice = "restore state/ from a backup, or provision into a new workspace (sites would need new kits)"
        try:
            doc = json.loads((self.state_dir / STATE_FILE).read_text())
            if not isinstance(doc, dict) or doc.get("format") != _STATE_FORMAT:
                raise ValueError(f"{STATE_FILE} has an unknown format")
        except (OSError, ValueError) as exc:
            raise WorkspaceStateError(f"{bad}: {exc}; {advice}") from None
        try:
            root = Identity.from_pem(
                (self.state_dir / ROOT_CERT).read_bytes(), (self.state_dir / ROOT_KEY).read_bytes()
            )
        except (OSError, ValueError, TypeError) as exc:
            raise WorkspaceStateError(f"{bad}: root CA unusable ({exc}); {advice}") from None
        if doc.get("root_fingerprint") != root.fingerprint:
            raise WorkspaceStateError(f"{bad}: root CA does not match the fingerprint recorded in {STATE_FILE}; {advice}")
        if doc.get("project") != self.project_name:
            raise WorkspaceStateError(f"{bad}: it belongs to project {doc.get('project')!r}; {advice}")
        if not isinstance(doc.get("participants"), dict) or not isinstance(doc.get("last_prod"), int):
            raise WorkspaceStateError(f"{bad}: {STATE_FILE} lacks participants or last_prod; {advice}")
        return root, doc

    def create_state(self, root: Identity) -> dict:
        """Write a fresh state folder (root CA included) all at once."""
        self.project_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".state.", dir=self.project_dir))
        doc = {
            "format": _STATE_FORMAT,
            "project": self.project_name,
            "root_fingerprint": root.fingerprint,
            "last_prod": 0,
            "participants": {},
        }
        try:
            write_atomic(staging / ROOT_CERT, root.cert_pem)
            write_atomic(staging / ROOT_KEY, root.key_pem, 0o600)
            write_atomic(staging / STATE_FILE, json.dumps(doc, indent=2).encode())
            os.chmod(staging, 0o700)
            staging.rename(self.state_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return doc

    def save_state(self, doc: dict) -> None:
        write_atomic(self.state_dir / STATE_FILE, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())

    # ---- prod folders ------------------------------------------------------------

    def next_prod_number(self, doc: dict) -> int:
        existing = [
            int(m.group(1))
            for p in (self.project_dir.iterdir() if self.project_dir.exists() else [])
            if (m := _PROD_RE.match(p.name))
        ]
        return max([doc["last_prod"], *existing]) + 1

    def load_identity(self, doc: dict, name: str, root: Identity) -> Identity:
        """A participant's current certificate and key, from the kit it was issued in."""
        record = doc["participants"][name]
        startup = self.project_dir / f"prod_{record['prod']:02d}" / name / STARTUP
        try:
            identity = Identity.from_pem(
                (startup / cert_file(name)).read_bytes(), (startup / key_file(name)).read_bytes()
            )
        except (OSError, ValueError, TypeError) as exc:
            raise WorkspaceStateError(
                f"cannot reuse the certificate of {name!r} from {startup}: {exc}; re-run without --add-site to re-issue all"
            ) from None
        if identity.fingerprint != record["cert_fingerprint"] or identity.cert.issuer != root.cert.subject:
            raise WorkspaceStateError(f"the certificate of {name!r} in {startup} is not the one recorded in state")
        return identity


def provision(
    project: Project,
    workspace_root: str | Path,
    add_sites: tuple[str, ...] | list[str] = (),
    password: str | object | None = None,
) -> ProvisionResult:
    """Write a new ``prod_NN`` with a kit and a package for every participant.

    Without ``add_sites`` every participant gets a new certificate from the (reused or
    new) root CA. With ``add_sites`` only those client sites are issued; every other
    participant keeps its certificate and key, and the server and admin kits list the
    new sites.
    """
    ws = Workspace(workspace_root, project.name)
    loaded = ws.load_state()
    created_root = loaded is None
    if add_sites:
        if loaded is None:
            raise WorkspaceStateError(
                f"--add-site needs an existing provisioned workspace at {ws.project_dir}; run a full provision first"
            )
        for name in add_sites:
            if project.participant(name).type != "client":
                raise ProjectError(f"--add-site {name!r}: only client sites can be added this way")
            if name in loaded[1]["participants"]:
                raise ProjectError(f"--add-site {name!r}: already provisioned; a full run re-issues every kit")
        known = set(loaded[1]["participants"]) | set(add_sites)
        missing = [p.name for p in project.participants if p.name not in known]
        if missing:
            raise ProjectError(
                f"participants {missing} are in project.yml but were never provisioned; add them with --add-site or run a full provision"
            )
    if loaded is None:
        root = create_root_ca(project.name, project.server.org)
        doc = ws.create_state(root)
    else:
        root, doc = loaded

    number = ws.next_prod_number(doc)
    prod_dir = ws.project_dir / f"prod_{number:02d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{prod_dir.name}.", dir=ws.project_dir))
    issued, reused = [], []
    kits, packages, passwords = {}, {}, {}
    records = {}
    try:
        for participant in project.participants:
            if add_sites and participant.name not in add_sites:
                identity = ws.load_identity(doc, participant.name, root)
                reused.append(participant.name)
                records[participant.name] = doc["participants"][participant.name]
            else:
                identity = issue_certificate(root, participant)
                issued.append(participant.name)
                records[participant.name] = {
                    "type": participant.type,
                    "org": participant.org,
                    "serial": format(identity.cert.serial_number, "x"),
                    "cert_fingerprint": identity.fingerprint,
                    "prod": number,
                }
            write_kit(staging / participant.name, project, participant, identity, root)
            kits[participant.name] = prod_dir / participant.name
            blob = zip_folder(staging / participant.name)
            if password is None:
                package_name = f"{participant.name}.zip"
            else:
                secret = generate_password() if password is GENERATE else str(password)
                passwords[participant.name] = secret
                blob = encrypt(blob, secret)
                package_name = f"{participant.name}{ENCRYPTED_SUFFIX}"
            write_atomic(staging / package_name, blob, 0o600)
            packages[participant.name] = prod_dir / package_name
        staging.rename(prod_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    doc["last_prod"] = number
    doc["participants"] = records
    ws.save_state(doc)
    return ProvisionResult(
        project=project,
        prod_dir=prod_dir,
        root_fingerprint=root.fingerprint,
        created_root=created_root,
        issued=issued,
        reused=reused,
        kits=kits,
        packages=packages,
        passwords=passwords,
    )

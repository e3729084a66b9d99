"""A provisioning workspace on disk: ``WORKSPACE/<project>/{state,prod_NN}``.

``state/`` keeps the root CA and what was issued, so re-runs and added sites reuse the
same root. It is written all at once when a workspace is new and checked in full when
it is read: a damaged state stops provisioning rather than starting a second root CA.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..files import write_atomic
from .certs import Identity
from .kits import STARTUP, cert_file, key_file

STATE_DIR = "state"
STATE_FILE = "state.json"
ROOT_CERT = "rootCA.pem"
ROOT_KEY = "rootCA.key"
_STATE_FORMAT = 1
_PROD_RE = re.compile(r"^prod_(\d+)$")
_NONE_ISSUED = -1  # last_prod of a workspace whose first prod_NN (prod_00) is still to come


class WorkspaceStateError(Exception):
    """The workspace's state cannot be trusted; provisioning refuses to go on."""


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
            "last_prod": _NONE_ISSUED,
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

    def prod_dir(self, number: int) -> Path:
        return self.project_dir / f"prod_{number:02d}"

    def next_prod_number(self, doc: dict) -> int:
        """``prod_00`` for a workspace's first kits, as NVIDIA FLARE numbers them; then one
        past both the recorded number and any ``prod_NN`` folder found (a workspace from
        before the count began at 00 goes on from where it is)."""
        existing = [
            int(m.group(1))
            for p in (self.project_dir.iterdir() if self.project_dir.exists() else [])
            if (m := _PROD_RE.match(p.name))
        ]
        # Nothing issued yet (state written by a run that failed before it published, by
        # this version or an older one that started from 0): no number is taken.
        last = doc["last_prod"] if doc["participants"] else _NONE_ISSUED
        return max([last, *existing]) + 1

    def load_identity(self, doc: dict, name: str, root: Identity) -> Identity:
        """A participant's current certificate and key, from the kit it was issued in."""
        record = doc["participants"][name]
        startup = self.prod_dir(record["prod"]) / name / STARTUP
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

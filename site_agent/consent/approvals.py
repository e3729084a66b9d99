"""The site operator's decisions on app versions: ``<app store>/<name>/<version>/consent.json``.

Written by ``flare approve`` (a separate process at the site, while the agent runs) and
read by the agent whenever it judges a version, so a decision takes effect at once,
without a restart. The file is replaced atomically; one that cannot be read counts as
no decision (the version stays held), never as an approval.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from .policy import REJECTED

log = logging.getLogger(__name__)

DECISION_FILE = "consent.json"
APPROVED = "approved"
DECISIONS = (APPROVED, REJECTED)


def read_decision(version_dir: Path) -> dict[str, Any] | None:
    """The recorded decision on the version in ``version_dir``, or None."""
    path = Path(version_dir) / DECISION_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable approval record %s: %s", path, exc)
        return None
    if not isinstance(doc, dict) or doc.get("decision") not in DECISIONS:
        log.warning("ignoring malformed approval record %s", path)
        return None
    return doc


def record_decision(version_dir: Path, decision: str, by: str | None = None, note: str = "") -> dict[str, Any]:
    """Record ``decision`` (approved or rejected) on the version in ``version_dir``; returns the record."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
    doc = {
        "decision": decision,
        "by": by or _operator(),
        "at_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "note": note,
    }
    version_dir = Path(version_dir)
    fd, tmp = tempfile.mkstemp(prefix=".consent-", dir=version_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, version_dir / DECISION_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return doc


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return f"uid {os.getuid()}"
